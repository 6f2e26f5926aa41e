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
    engine = BatchEngine.create(runtime, invariant=True)  # may switch oneDNN off, NNPACK always, process-wide
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
    # Without guidance a request is a single UNet row alone (the engine doubles it).
    unguided = params(engine, "a blue triangle on a white background", 2, guidance_scale=1.0)
    unguided_alone = engine.start(unguided)
    assert unguided_alone.rows == 1
    while not unguided_alone.done:
        engine.tick([unguided_alone])
    # The same request again, joined by others with other prompts, guidance and a late start.
    again = engine.start(target)
    others = [
        engine.start(params(engine, "a green square on a black background", 1)),
        engine.start(unguided),
    ]
    engine.tick([again, *others])
    late = engine.start(params(engine, "a red circle on a blue background", 3))
    while not again.done:
        engine.tick([again, *others, late])
    assert torch.equal(alone.latents, again.latents)
    assert others[1].done and torch.equal(unguided_alone.latents, others[1].latents)
    # The text-pooled embedding was computed once per distinct text, not once per row and step.
    pooled = engine.pipe.unet.add_embedding
    assert type(pooled).__name__ == "Rowwise" and 0 < len(pooled.results) <= 5


def test_a_request_split_after_running_out_of_memory_gives_the_same_bits(engine) -> None:
    """A job of several images that ran out of memory alone runs one image's UNet rows per call,
    in every tick it takes part in; its images and its batch-mates' are those of one call."""
    import torch

    def run(chunk_rows: int | None) -> list[torch.Tensor]:
        big = engine.start(params(engine, "a red circle on a blue background", 4, num_images=3))
        other = engine.start(params(engine, "a green square on a black background", 8))
        big.chunk_rows = chunk_rows
        calls = 0
        unet = engine.pipe.unet.forward

        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return unet(*args, **kwargs)

        engine.pipe.unet.forward = counted
        try:
            engine.tick([big])
            while not big.done:
                engine.tick([big, other])
        finally:
            del engine.pipe.unet.forward
        assert calls == (8 if chunk_rows is None else 3 + 7 * 4)  # 3 images alone, then 3 + 1 (2 rows each)
        return [big.latents, other.latents]

    whole, split = run(None), run(2)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))


def test_without_invariance_nothing_is_switched_or_wrapped() -> None:
    import torch

    from worker.batching import BatchEngine
    from worker.runtime import DiffusersRuntime

    # What IMAGEGEN_BATCH_INVARIANT=false gives the worker, and what a CUDA worker always gets (it
    # ignores `true`: see test_gpu_paths.py): the model's own kernels and layers.
    assert Settings(batch_invariant=False).invariant_batches is False
    assert Settings().invariant_batches is True
    assert Settings(device="cuda", dtype="float16").invariant_batches is False
    assert Settings(device="cuda", batch_invariant=True).invariant_batches is False
    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    before = torch.backends.mkldnn.enabled
    assert BatchEngine.create(runtime, invariant=False) is not None
    assert torch.backends.mkldnn.enabled == before
    assert type(runtime.pipe.unet.add_embedding).__name__ != "Rowwise"
    assert type(runtime.pipe.unet.time_embedding).__name__ != "Rowwise"


def test_the_invariance_check_catches_batch_dependent_rows(engine, monkeypatch) -> None:
    from worker import batching

    assert batching._rows_agree(engine, 8)
    real = engine._unet
    # A UNet whose rows shift by a rounding-sized amount with the batch size, as a kernel choice does.
    monkeypatch.setattr(engine, "_unet", lambda x, t, e: real(x, t, e) + 1e-6 * x.shape[0])
    assert not batching._rows_agree(engine, 8)


def test_native_convolutions_when_the_check_fails(monkeypatch) -> None:
    import torch

    from worker import batching
    from worker.runtime import DiffusersRuntime

    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    answers = iter([False, True])  # oneDNN's rows disagree, the native kernels' agree
    monkeypatch.setattr(batching, "_rows_agree", lambda engine, rows: next(answers))
    mkldnn = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = True  # type: ignore[assignment]
        engine = batching.BatchEngine.create(runtime, invariant=True)
        assert engine is not None and engine.invariant
        assert torch.backends.mkldnn.enabled is False
    finally:
        torch.backends.mkldnn.enabled = mkldnn  # type: ignore[assignment]


@pytest.mark.parametrize(("model", "lone"), [("tiny-random", False), ("tiny-shapes", True)])
def test_images_decoded_together_are_the_images_decoded_alone(model: str, lone: bool) -> None:
    """tiny-random's VAE rounds rows differently in odd- and even-sized batches (a lone image is
    padded to two); tiny-shapes' decodes a lone image as itself. Both paths are covered."""
    import torch

    from worker.batching import BatchEngine
    from worker.runtime import DiffusersRuntime

    mkldnn = torch.backends.mkldnn.enabled
    try:
        runtime = DiffusersRuntime.load(Settings(model=model))
        engine = BatchEngine.create(runtime, invariant=True, max_rows=8)
        assert engine is not None and engine.batched_decode and engine.lone_decode is lone
        requests = []
        for i in range(4):
            request = engine.start(runtime.info.fill(GenerationParams(prompt=f"p{i}", seed=i, num_inference_steps=2)))
            while not request.done:
                engine.tick([request])
            requests.append(request)
        alone = [engine.decode(r)[0].tobytes() for r in requests]
        for group in (requests[:2], requests[:3], requests):
            together = [images[0].tobytes() for images in engine.decode_many(group)]
            assert together == alone[: len(group)]
    finally:
        torch.backends.mkldnn.enabled = mkldnn  # type: ignore[assignment]


def test_the_decode_check_catches_batch_dependent_rows(engine, monkeypatch) -> None:
    from worker import batching

    assert batching._decoded_rows_agree(engine, 8) and batching._decoded_rows_agree(engine, 8, lone=True)
    vae = engine.pipe.vae
    real = vae.decode
    monkeypatch.setattr(vae, "decode", lambda x, return_dict: (real(x, return_dict=False)[0] + 1e-6 * x.shape[0],))
    assert not batching._decoded_rows_agree(engine, 8)
    assert not batching._decoded_rows_agree(engine, 8, lone=True)


def test_prompts_are_encoded_on_one_thread_with_the_same_bits(engine, monkeypatch) -> None:
    """A request's text encoding runs on the calling thread alone (a busy worker's other torch
    threads would make each of its tiny ops wait) and gives the bits it gives on every thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the worker runs
    try:
        seen: list[int] = []
        real = engine.pipe.encode_prompt
        monkeypatch.setattr(engine.pipe, "encode_prompt", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
        with torch.inference_mode():
            ours = engine._embed("a green triangle")
            stock = real("a green triangle", engine.device, 1, False)[0]  # on both threads
        assert seen == [1] and torch.get_num_threads() == 2  # ...and both threads again after
        assert torch.equal(ours, stock)
    finally:
        torch.set_num_threads(threads)


def test_a_pipelines_safety_checker_sees_batched_images_too(engine, monkeypatch) -> None:
    """The pipeline's own call runs its safety checker (sd-1.5 from the hub ships one); the batch
    engine decoded without it, so `MAX_BATCH > 1` served what `MAX_BATCH=1` blacked out."""
    import torch

    requests = []
    for i in range(2):
        request = engine.start(params(engine, f"p{i}", i))
        while not request.done:
            engine.tick([request])
        requests.append(request)
    plain = [images[0].tobytes() for images in engine.decode_many(requests)]
    seen: list[int] = []

    def checker(image, device, dtype):  # flags the second image, zeroing it as diffusers' checker does
        seen.append(image.shape[0])
        image = image.clone()
        image[1] = 0
        return image, [False, True]

    monkeypatch.setattr(engine.pipe, "safety_checker", object())
    monkeypatch.setattr(engine.pipe, "run_safety_checker", checker)
    checked = [images[0] for images in engine.decode_many(requests)]
    assert seen == [2]
    assert checked[0].tobytes() == plain[0]
    assert not torch.tensor(list(checked[1].getdata())).any()  # black
