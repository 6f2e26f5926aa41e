"""The batching engine on the committed tiny-shapes model (text-pooled embedding, so the per-row
layers and their cache are exercised): a request gives the same bits alone and batched."""

from __future__ import annotations

import pytest

from app.core.config import Settings
from app.core.jobs import GenerationParams


@pytest.fixture
def engine():
    import torch

    from worker.batching import BatchEngine
    from worker.runtime import DiffusersRuntime

    mkldnn, nnpack = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    engine = BatchEngine.create(runtime, invariant=True)  # switches oneDNN and NNPACK off process-wide
    assert engine is not None
    yield engine
    torch.backends.mkldnn.enabled = mkldnn  # type: ignore[assignment]
    torch.backends.nnpack.set_flags(nnpack)


def params(engine, prompt: str, seed: int, **kw) -> GenerationParams:
    return engine.runtime.info.fill(GenerationParams(prompt=prompt, seed=seed, num_inference_steps=8, **kw))


def test_alone_and_batched_give_the_same_bits(engine) -> None:
    import torch

    target = params(engine, "a red circle on a blue background", 11)
    alone = engine.start(target)
    while not alone.done:
        engine.tick([alone])
    # The same request again, joined by others with other prompts, guidance and a late start.
    again = engine.start(target)
    others = [
        engine.start(params(engine, "a green square on a black background", 1)),
        engine.start(params(engine, "a blue triangle on a white background", 2, guidance_scale=1.0)),
    ]
    engine.tick([again, *others])
    late = engine.start(params(engine, "a red circle on a blue background", 3))
    while not again.done:
        engine.tick([again, *others, late])
    assert torch.equal(alone.latents, again.latents)
    # The text-pooled embedding was computed once per distinct text, not once per row and step.
    pooled = engine.pipe.unet.add_embedding
    assert type(pooled).__name__ == "Rowwise" and 0 < len(pooled.results) <= 5


def test_without_invariance_nothing_is_switched_or_wrapped() -> None:
    import torch

    from worker.batching import BatchEngine
    from worker.runtime import DiffusersRuntime

    # What IMAGEGEN_BATCH_INVARIANT=false gives the worker: the model's own kernels and layers.
    assert Settings(batch_invariant=False).batch_invariant is False
    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    before = torch.backends.mkldnn.enabled
    assert BatchEngine.create(runtime, invariant=False) is not None
    assert torch.backends.mkldnn.enabled == before
    assert type(runtime.pipe.unet.add_embedding).__name__ != "Rowwise"
    assert type(runtime.pipe.unet.time_embedding).__name__ != "Rowwise"
