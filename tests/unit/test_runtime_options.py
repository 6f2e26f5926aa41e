"""The worker's deployment switches on the real tiny-random pipeline: channels-last layout and
`torch.compile` change how the UNet runs, not what it draws."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.config import Settings
from app.core.jobs import GenerationParams


def draw(**switches: bool) -> tuple[np.ndarray, object]:
    from worker.runtime import DiffusersRuntime

    runtime = DiffusersRuntime.load(Settings(model="tiny-random", **switches))
    params = runtime.info.fill(GenerationParams(prompt="a red circle", seed=5, num_inference_steps=2))
    (image,) = runtime.generate(params, lambda step, total: None)
    return np.asarray(image, dtype=np.int16), runtime.pipe.unet


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    image, _ = draw()
    return image


def test_channels_last_keeps_the_image(reference: np.ndarray) -> None:
    import torch

    image, unet = draw(channels_last=True)
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # really re-laid out, not a no-op
    assert np.abs(image - reference).max() <= 1  # other kernels, same picture (at most one level off)


def test_compiled_unet_keeps_its_class_and_the_image(reference: np.ndarray) -> None:
    from diffusers import UNet2DConditionModel

    image, unet = draw(compile=True)
    assert isinstance(unet, UNet2DConditionModel)  # compiled in place: batching still recognises it
    assert unet._compiled_call_impl is not None
    assert np.abs(image - reference).max() <= 1


def test_attention_modules_call_their_processor_directly_with_the_same_bits(monkeypatch) -> None:
    """The loaded pipeline's attention layers skip diffusers' per-call `inspect.signature` of their
    processor; each UNet output is bit for bit the stock module's, and a call with extra keyword
    arguments still goes through diffusers' own filtering."""
    import inspect

    import torch
    from diffusers import AutoPipelineForText2Image
    from diffusers.models import attention_processor
    from diffusers.models.attention_processor import Attention

    from models.registry import resolve
    from worker.runtime import DiffusersRuntime, direct_attention

    ours = DiffusersRuntime.load(Settings(model="tiny-random")).pipe
    stock = AutoPipelineForText2Image.from_pretrained(resolve("tiny-random"))
    attention = [m for c in ours.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    attention = [m for m in attention if isinstance(m, Attention)]
    assert len(attention) == 10 and all("forward" in vars(m) for m in attention)  # 8 in the UNet, 2 in the VAE
    assert direct_attention(ours) == 0  # switching twice changes nothing

    inspected = []
    real_signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda obj, **kw: inspected.append(obj) or real_signature(obj, **kw))
    config = ours.unet.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, config.in_channels, 32, 32, generator=generator)
    text = torch.randn(3, 77, config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        for t in (1.0, 501.0, 981.0):
            times = torch.full((3,), t)
            expected = stock.unet(x, times, encoder_hidden_states=text, return_dict=False)[0]
            assert len(inspected) == 8  # the stock UNet inspects at each of its attention layers...
            inspected.clear()
            got = ours.unet(x, times, encoder_hidden_states=text, return_dict=False)[0]
            assert inspected == [] and torch.equal(got, expected)  # ...the loaded one at none
        layer = next(m for m in ours.unet.modules() if isinstance(m, Attention))
        hidden = torch.randn(1, 16, layer.query_dim, generator=generator)
        plain = layer(hidden)
        logged: list[str] = []
        monkeypatch.setattr(attention_processor.logger, "warning", lambda message, *a, **kw: logged.append(message))
        extra = layer(hidden, unexpected=1)
    assert len(inspected) == 1 and torch.equal(extra, plain)
    assert len(logged) == 1 and "unexpected" in logged[0]  # diffusers' own warning, as before


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_pndm_samples_any_number_of_steps(steps: int) -> None:
    # From a model whose own sampler is another (no `skip_prk_steps` in its config): PNDM's
    # Runge-Kutta warm-up failed below 4 steps, which the API allows.
    import diffusers
    import torch

    from app.core.jobs import Scheduler
    from worker.runtime import SCHEDULER_CLASSES

    cls_name, extra = SCHEDULER_CLASSES[Scheduler.pndm]
    scheduler = getattr(diffusers, cls_name).from_config(diffusers.DDIMScheduler().config, **extra)
    scheduler.set_timesteps(steps)
    x = torch.ones(1, 4, 8, 8)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    assert len(scheduler.timesteps) >= steps and torch.isfinite(x).all()


def test_pndm_progress_never_passes_its_total() -> None:
    # PNDM runs one timestep more than the steps asked for: progress went (6, 5).
    from worker.runtime import DiffusersRuntime

    runtime = DiffusersRuntime.load(Settings(model="tiny-random"))
    params = runtime.info.fill(GenerationParams(prompt="a red circle", seed=5, num_inference_steps=5, scheduler="pndm"))
    seen: list[tuple[int, int]] = []
    runtime.generate(params, lambda step, total: seen.append((step, total)))
    assert len(seen) == 6 and seen[:5] == [(s, 5) for s in range(1, 6)] and seen[5] == (5, 5)


def test_a_model_saved_with_a_sampler_we_do_not_name_keeps_it(tmp_path) -> None:
    # It was published as `euler` and every job ran Euler: an LCM-distilled model drew noise.
    # (DDPM here: LMS would need scipy.)
    import diffusers

    from models.registry import resolve
    from worker.batching import BatchEngine
    from worker.runtime import DiffusersRuntime

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(resolve("tiny-random"))
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    runtime = DiffusersRuntime.load(Settings(model=str(tmp_path)))
    assert runtime.info.scheduler == "native"
    params = runtime.info.fill(GenerationParams(prompt="a red circle", seed=5, num_inference_steps=2))
    (native,) = runtime.generate(params, lambda step, total: None)
    assert type(runtime.pipe.scheduler).__name__ == "DDPMScheduler"
    runtime.generate(params.model_copy(update={"scheduler": "euler"}), lambda step, total: None)
    assert type(runtime.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    # The batching engine runs it too, each request on its own copy, to the same image.
    engine = BatchEngine.create(runtime, invariant=False)
    assert engine is not None
    request = engine.start(params)
    assert type(request.scheduler).__name__ == "DDPMScheduler" and request.scheduler is not runtime.pipe.scheduler
    (batched,) = engine.generate(params)
    assert np.abs(np.asarray(batched, dtype=np.int16) - np.asarray(native, dtype=np.int16)).max() <= 2


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"width": "wide"}', "width"),
        ('{"widht": 64}', "widht"),  # misspelt: it was ignored without a word
        ('{"scheduler": "karras"}', "scheduler"),
        ('{"width": 36}', "width"),  # not a multiple of 8: every job (and the warm-up) refused
        ('{"num_inference_steps": 1000}', "num_inference_steps"),  # beyond what a request may ask
        ('{"guidance_scale": 1e999}', "guidance_scale"),
        ('["width", 64]', "the file"),  # not an object: a TypeError at start-up
        ("{width: 64", "the file"),
    ],
)
def test_imagegen_json_is_checked(tmp_path, text: str, where: str) -> None:
    from worker.runtime import _read_defaults

    (tmp_path / "imagegen.json").write_text(text)
    with pytest.raises(ValueError, match=rf"imagegen\.json: {where}"):
        _read_defaults(str(tmp_path))


def test_imagegen_json_sizes_given_as_text_are_numbers(tmp_path) -> None:
    # "512" * 8 made the size bound a 24-digit number: no bound at all.
    from worker.runtime import _read_defaults

    (tmp_path / "imagegen.json").write_text('{"width": "512", "height": 512, "scheduler": "euler"}')
    assert _read_defaults(str(tmp_path)) == {"width": 512, "height": 512, "scheduler": "euler"}
    assert _read_defaults(str(tmp_path / "nowhere")) == {}
