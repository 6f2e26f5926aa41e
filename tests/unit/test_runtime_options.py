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
