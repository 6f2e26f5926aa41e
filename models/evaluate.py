"""Prompt-following accuracy of the tiny-shapes pipeline, scored by the procedural checker.

First checks the checker itself on ground-truth renders, then generates images for held-out
(colour, shape, background) combos and for seen combos with the pipeline's defaults
(imagegen.json), reads each back with `models.shapes.check`, and prints fg/bg/shape accuracy,
seconds per image on one CPU thread, and, with --grid, writes a small sample grid. It writes nothing
into the model folder unless --grid or --json points there.

    python -m models.evaluate [--model models/weights/tiny-shapes] [--per-held 9] [--per-seen 2] [--seed 1000]
    python -m models.evaluate --model .data/trained/tiny-shapes --grid .data/trained/samples.png

Every option is checked before the model is loaded (bad values exit with status 2 and a message).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from app.core.jobs import Scheduler
from models import shapes
from models.train import non_negative_float, non_negative_int, positive_int

PROG = "python -m models.evaluate"
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "tiny-shapes"


def checker_accuracy(n: int = 1000, seed: int = 7) -> dict[str, float]:
    """The checker on ground-truth renders of all 168 combos (should be ~100%)."""
    rng = np.random.default_rng(seed)
    imgs, combos, _ = shapes.sample_batch(n, rng, shapes.all_combos())
    return shapes.score([shapes.check(i) for i in imgs], combos)


def load_pipeline(model: Path, scheduler: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    if scheduler and scheduler != "native":  # native: the sampler saved with the model
        from models.train import make_scheduler

        pipe.scheduler = make_scheduler(scheduler)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 48) -> np.ndarray:
    """uint8 N×32×32×3 images, one generator per image so results don't depend on batching."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        res = pipe(
            prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np"
        )
        out.append((res.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def seconds_per_image(pipe, steps: int, guidance: float, repeats: int = 5) -> float:
    """Median wall time of one 32×32 image at the given settings on ONE CPU thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(pipe, ["a red circle on a blue background"], [0], steps, guidance)  # warm-up
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            generate(pipe, ["a red circle on a blue background"], [r], steps, guidance)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return float(np.median(times))


def save_grid(path: Path, imgs: np.ndarray, cols: int = 8, scale: int = 2) -> None:
    from PIL import Image

    rows = int(np.ceil(len(imgs) / cols))
    s = shapes.SIZE * scale + 2
    grid = np.full((rows * s, cols * s, 3), 128, dtype=np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        big = img.repeat(scale, 0).repeat(scale, 1)
        grid[r * s + 1 : r * s + 1 + big.shape[0], c * s + 1 : c * s + 1 + big.shape[1]] = big
    Image.fromarray(grid).save(path, optimize=True)


def evaluate(
    model: Path,
    per_held: int,
    per_seen: int,
    steps: int | None,
    guidance: float | None,
    scheduler: str | None,
    threads: int,
    speed: bool,
    grid: Path | None,
    seed: int = 1000,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    defaults = json.loads((model / "imagegen.json").read_text())
    steps = defaults["num_inference_steps"] if steps is None else steps
    guidance = defaults["guidance_scale"] if guidance is None else guidance
    pipe = load_pipeline(model, scheduler)
    result: dict = {
        "settings": {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "scheduler": scheduler or defaults["scheduler"],
        }
    }
    result["checker_on_ground_truth"] = checker_accuracy()
    print(f"checker on 1000 ground-truth images: {result['checker_on_ground_truth']}")

    # Prompts cycle through the caption templates so every phrasing is exercised.
    sets = {
        "held_out": [(c, k % len(shapes.TEMPLATES)) for c in shapes.held_out_combos() for k in range(per_held)],
        "seen": [
            (c, (k + i) % len(shapes.TEMPLATES)) for i, c in enumerate(shapes.train_combos()) for k in range(per_seen)
        ],
    }
    samples = []
    for name, items in sets.items():
        if not items:
            continue
        prompts = [c.caption(t) for c, t in items]
        seeds = [seed + i for i in range(len(items))]
        t0 = time.time()
        imgs = generate(pipe, prompts, seeds, steps, guidance)
        readings = [shapes.check(i) for i in imgs]
        acc = shapes.score(readings, [c for c, _ in items])
        acc["n"] = len(items)
        acc["gen_s"] = round(time.time() - t0, 1)
        # Which shapes the checker saw for each requested shape: shows what the model confuses.
        acc["shape_confusion"] = {
            s: dict(Counter(str(r.shape) for r, (c, _) in zip(readings, items, strict=False) if c.shape == s))
            for s in shapes.SHAPES
        }
        result[name] = acc
        print(
            f"{name:9s} n={acc['n']:3d}  fg {acc['fg']:.3f}  bg {acc['bg']:.3f}  shape {acc['shape']:.3f}  all {acc['all']:.3f}  ({acc['gen_s']}s)"
        )
        print(f"          shape confusion (requested -> read): {acc['shape_confusion']}")
        samples.append(imgs[:: max(1, len(imgs) // 16)][:16])
    if speed:
        result["seconds_per_image_1_thread"] = round(seconds_per_image(pipe, steps, guidance), 3)
        print(f"seconds per image (1 thread, {steps} steps, cfg {guidance}): {result['seconds_per_image_1_thread']}")
    if grid and samples:
        save_grid(grid, np.concatenate(samples))
        print(f"wrote {grid} (top: held-out combos, bottom: seen combos)")
    return result


def check_writable(path: Path, option: str) -> str | None:
    """Why `path` could not be written at the end of the run, or None (checked before any work)."""
    if path.is_dir():
        return f"{option} {path} is a folder; give a file path"
    parent = path.parent
    if not parent.is_dir():
        return f"{option} {path}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{option} {path}: not writable"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked options; any bad value exits with status 2 and a message, before any work."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pipeline folder with imagegen.json")
    ap.add_argument("--per-held", type=non_negative_int, default=9, help="images per held-out combo (24 combos)")
    ap.add_argument("--per-seen", type=non_negative_int, default=2, help="images per seen combo (144 combos)")
    ap.add_argument("--steps", type=positive_int, default=None, help="override imagegen.json")
    ap.add_argument("--guidance", type=non_negative_float, default=None, help="override imagegen.json")
    ap.add_argument("--scheduler", choices=[s.value for s in Scheduler], default=None, help="override imagegen.json")
    # 1 thread by default: on a shared 2-core box, 2 OpenMP threads stall badly under other load.
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--no-speed", action="store_true", help="skip the 1-thread timing")
    ap.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="also write a PNG grid of samples here (default: no grid; the shipped model's samples.png is "
        "only rewritten when this names it)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    ap.add_argument("--seed", type=non_negative_int, default=1000, help="first seed (image i uses seed + i)")
    args = ap.parse_args(argv)
    if args.per_held == 0 and args.per_seen == 0:
        ap.error("--per-held and --per-seen are both 0: there would be nothing to evaluate")
    model: Path = args.model
    if not model.is_dir():
        ap.error(f"--model {model}: no such folder")
    for name in ("model_index.json", "imagegen.json"):
        if not (model / name).is_file():
            ap.error(f"--model {model} is not a tiny-shapes pipeline folder (no {name}); train one with models.train")
    try:
        defaults = json.loads((model / "imagegen.json").read_text())
        missing = {"num_inference_steps", "guidance_scale", "scheduler"} - set(defaults)
    except (OSError, ValueError, TypeError) as e:
        ap.error(f"--model {model}: cannot read imagegen.json ({e})")
    if missing:
        ap.error(f"--model {model}: imagegen.json lacks {', '.join(sorted(missing))}")
    for option, path in (("--grid", args.grid), ("--json", args.json)):
        problem = path is not None and check_writable(path, option)
        if problem:
            ap.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = evaluate(
        args.model,
        args.per_held,
        args.per_seen,
        args.steps,
        args.guidance,
        args.scheduler,
        args.threads,
        not args.no_speed,
        args.grid,
        seed=args.seed,
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
