"""Unit tests for the synthetic shapes data, the procedural checker and the held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models import shapes


def test_generator_is_deterministic_for_a_seed():
    a_imgs, a_combos, a_t = shapes.sample_batch(32, np.random.default_rng(5))
    b_imgs, b_combos, b_t = shapes.sample_batch(32, np.random.default_rng(5))
    assert np.array_equal(a_imgs, b_imgs)
    assert a_combos == b_combos and a_t == b_t
    c_imgs, _, _ = shapes.sample_batch(32, np.random.default_rng(6))
    assert not np.array_equal(a_imgs, c_imgs)


def test_render_uses_exact_palette_colours():
    rng = np.random.default_rng(0)
    for combo in shapes.all_combos()[::7]:
        img = shapes.render(combo, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        colours = {tuple(int(v) for v in p) for p in img.reshape(-1, 3)}
        assert colours == {shapes.PALETTE[combo.fg], shapes.PALETTE[combo.bg]}
        # The shape never touches the 2-pixel border, so the border is pure background.
        assert (img[:2] == shapes.PALETTE[combo.bg]).all() and (img[:, -2:] == shapes.PALETTE[combo.bg]).all()


def test_captions_name_the_right_things():
    c = shapes.Combo("red", "circle", "blue")
    assert c.caption(0) == "a red circle on a blue background"
    assert c.caption(1) == "blue background with a red circle"
    for t in range(len(shapes.TEMPLATES)):
        words = c.caption(t).split()
        assert {"red", "circle", "blue"} <= set(words)


def test_checker_is_accurate_on_ground_truth():
    rng = np.random.default_rng(42)
    imgs, combos, _ = shapes.sample_batch(200, rng, shapes.all_combos())
    acc = shapes.score([shapes.check(i) for i in imgs], combos)
    assert acc["fg"] == 1.0 and acc["bg"] == 1.0
    assert acc["shape"] >= 0.98


def test_checker_tolerates_noise():
    # Generated images are not exact palette colours: add noise and it must still read them.
    rng = np.random.default_rng(3)
    imgs, combos, _ = shapes.sample_batch(100, rng, shapes.all_combos())
    noisy = np.clip(imgs.astype(int) + rng.integers(-60, 61, imgs.shape), 0, 255).astype(np.uint8)
    acc = shapes.score([shapes.check(i) for i in noisy], combos)
    assert acc["fg"] >= 0.98 and acc["bg"] >= 0.98 and acc["shape"] >= 0.9


def test_checker_reports_missing_foreground():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    reading = shapes.check(img)
    assert reading.bg == "black" and reading.fg is None and reading.shape is None


def test_held_out_split():
    held, train = shapes.held_out_combos(), shapes.train_combos()
    assert len(held) + len(train) == len(shapes.all_combos()) == 168
    assert 15 <= len(held) <= 40 and not set(held) & set(train)
    # Every colour pair and every colour-shape pairing still appears in training.
    assert {(c.fg, c.bg) for c in train} == {(c.fg, c.bg) for c in shapes.all_combos()}
    assert {(c.fg, c.shape) for c in train} == {(c.fg, c.shape) for c in shapes.all_combos()}
    assert {(c.bg, c.shape) for c in train} == {(c.bg, c.shape) for c in shapes.all_combos()}
    # The default (training) sampler never draws a held-out combo.
    _, drawn, _ = shapes.sample_batch(2000, np.random.default_rng(0))
    assert not set(drawn) & set(held)


# The committed pipeline: must exist (no skip) and must follow a simple prompt.
MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "weights" / "tiny-shapes"


def test_committed_pipeline_follows_a_prompt(monkeypatch):
    import json

    import torch
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (MODEL_DIR / "model_index.json").is_file(), f"trained pipeline missing at {MODEL_DIR}"
    defaults = json.loads((MODEL_DIR / "imagegen.json").read_text())
    assert set(defaults) == {"width", "height", "num_inference_steps", "guidance_scale", "scheduler"} | {
        "max_width",
        "max_height",
    }
    from models.train import DEFAULTS

    assert defaults == DEFAULTS  # a retrain writes the same imagegen.json
    pipe = DiffusionPipeline.from_pretrained(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=defaults["num_inference_steps"],
        guidance_scale=defaults["guidance_scale"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert out.shape == (32, 32, 3)
    img = (out * 255).round().clip(0, 255).astype(np.uint8)
    reading = shapes.check(img)
    assert reading.fg == "red" and reading.bg == "blue"
    # "Mostly" red on blue: most pixels are one of the two requested colours.
    labels = shapes.nearest_colour(img)
    red, blue = shapes.COLOURS.index("red"), shapes.COLOURS.index("blue")
    assert ((labels == red) | (labels == blue)).mean() > 0.9
    assert (labels == blue).mean() > 0.3 and (labels == red).mean() > 0.05


def test_every_scheduler_the_api_offers_draws_the_prompted_colours():
    """Through the worker's own runtime: DDIM built from tiny-shapes' saved (DPM++) config clipped
    its x0 estimates, and drew the wrong colours for nearly every prompt."""
    from app.core.config import Settings
    from app.core.jobs import GenerationParams, Scheduler
    from worker.runtime import DiffusersRuntime

    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    combos = [("red", "blue", "circle"), ("green", "white", "square"), ("yellow", "black", "triangle")]
    right: dict[str, int] = {}
    for scheduler in Scheduler:
        right[scheduler.value] = 0
        for fg, bg, shape in combos:
            params = GenerationParams(prompt=f"a {fg} {shape} on a {bg} background", seed=1, scheduler=scheduler)
            image = runtime.generate(runtime.info.fill(params), lambda step, total: None)[0]
            reading = shapes.check(np.asarray(image.convert("RGB")))
            right[scheduler.value] += reading.fg == fg and reading.bg == bg
    assert all(n >= len(combos) - 1 for n in right.values()), right
