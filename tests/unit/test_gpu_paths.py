"""The worker's GPU-only paths, checked on the CPU: torch.compile failing or recompiling, batch
invariance kept off CUDA, bfloat16 rows, generators on the CPU whatever the device, the start-up
line. No CUDA here: where a path needs a device, a fake pipeline or the meta device stands in."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from app.core.config import Settings
from app.core.jobs import GenerationParams, ModelInfo


@pytest.fixture
def dynamo():
    """Dynamo's caches and counters, fresh (compiled code of other tests' UNets shares the code
    objects, and their cache entries count against the recompile limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def _tiny(**settings: Any):
    from worker.runtime import DiffusersRuntime

    return DiffusersRuntime.load(Settings(model="tiny-random", **settings))


def _params(runtime, **kw: Any) -> GenerationParams:
    return runtime.info.fill(GenerationParams(**{"prompt": "a red circle", "seed": 5, "num_inference_steps": 2, **kw}))


# -- torch.compile -------------------------------------------------------------------------------


def test_a_failing_compiler_leaves_the_unet_eager_with_a_warning(dynamo, monkeypatch, caplog) -> None:
    """Without a C compiler (the slim images), inductor raised at the warm-up's first UNet call and
    the worker, which caught only OSError and ValueError, exited with a traceback at every start."""
    from worker import runtime as runtime_module

    calls: list[int] = []

    def no_compiler(graph: Any, example_inputs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(runtime_module, "COMPILE_BACKEND", no_compiler)
    runtime = _tiny(compile=True)
    assert runtime.pipe.unet._compiled_call_impl is not None
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        runtime.warm_up()
    assert calls and runtime.pipe.unet._compiled_call_impl is None and not runtime.compiled
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "compiling the UNet failed" in warning.getMessage()
    assert "RuntimeError: No working C++ compiler found" in warning.getMessage()  # the cause, unwrapped
    # Really eager again: no more compiling, and the eager UNet's very bits.
    calls.clear()
    (image,) = runtime.generate(_params(runtime), lambda step, total: None)
    (eager,) = _tiny().generate(_params(runtime), lambda step, total: None)
    assert calls == [] and image.tobytes() == eager.tobytes()


def test_a_worker_without_a_c_compiler_starts_uncompiled(tmp_path) -> None:
    """The real thing: `python -m worker` with IMAGEGEN_COMPILE and no compiler on PATH (inductor,
    fresh caches) exited with a traceback after the load; now it warns and serves (here it reaches
    its wait for Redis, which is not there). ~25 s, most of it inductor's lowering before it fails."""
    import os
    import subprocess
    import sys
    import time

    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.update(IMAGEGEN_MODEL="tiny-random", IMAGEGEN_COMPILE="true", IMAGEGEN_LOG_FORMAT="text",
               IMAGEGEN_REDIS_URL="redis://127.0.0.1:1/0", IMAGEGEN_MAX_BATCH="1")  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Redis unavailable" in line or time.monotonic() > deadline:
                break
    finally:
        process.terminate()
        process.wait(30)
    text = "".join(lines)
    assert "Traceback" not in text, text[-3000:]
    assert "compiling the UNet failed (InvalidCxxCompiler: No working C++ compiler found" in text, text[-3000:]
    assert "model tiny-random ready" in text and "Redis unavailable" in text


def test_an_error_the_eager_unet_gives_too_is_raised(dynamo, monkeypatch) -> None:
    from worker import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "COMPILE_BACKEND", "eager")
    runtime = _tiny(compile=True)
    runs: list[bool] = []

    def refused() -> None:
        runs.append(runtime.compiled)
        raise ValueError("width: not a multiple of 64")

    with pytest.raises(ValueError, match="multiple of 64"):
        runtime.eager_if_compiling_fails(refused)
    assert runs == [True, False]


def test_compile_failure_names_the_innermost_cause() -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    from worker.runtime import compile_failure

    inner = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")
    wrapped = BackendCompilerFailed(lambda g, i: g, inner, None)
    assert (
        compile_failure(wrapped)
        == "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    )
    assert compile_failure(ValueError()) == "ValueError"


def test_a_compiled_batching_worker_compiles_only_at_its_warm_up(dynamo, monkeypatch) -> None:
    """Dynamo compiled at the warm-up (2 rows), again at the first batch of several jobs (the batch
    dimension turns dynamic) and again at the first guidance-free job alone (1 row): on a GPU tens
    of seconds each for SD 1.5, inside a live batch. The warm-up now covers them."""
    from worker import runtime as runtime_module
    from worker.batching import BatchEngine

    monkeypatch.setattr(runtime_module, "COMPILE_BACKEND", "eager")  # dynamo's guards, without inductor
    runtime = _tiny(compile=True)
    engine = BatchEngine.create(runtime, invariant=False, max_rows=8)
    assert engine is not None
    engine.warm_up()
    assert runtime.compiled
    graphs = dynamo["stats"]["unique_graphs"]
    assert graphs >= 3
    unguided: dict[str, Any] = {"guidance_scale": 0.0}
    batches: list[list[dict[str, Any]]] = [[{}, {}], [{}, {}, unguided], [unguided], [{}], [{}, {}, {}, {}]]
    for batch in batches:
        requests = [engine.start(_params(runtime, seed=i, **kw)) for i, kw in enumerate(batch)]
        while not all(r.done for r in requests):
            engine.tick(requests)
    assert dynamo["stats"]["unique_graphs"] == graphs
    assert not dynamo["recompiles"]


def test_the_per_row_layers_are_not_traced_by_dynamo(dynamo) -> None:
    """Dynamo traced into the per-row layers: `ndarray.tobytes` broke the graph, and every new row's
    key guarded the cache dictionary, so each step recompiled until the recompile limit."""
    import torch

    from worker.batching import _rowwise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), _rowwise(torch.nn.Linear(8, 8)), torch.nn.Linear(8, 8))
    compiled = torch.compile(model, backend="eager")
    with torch.inference_mode():
        for _ in range(6):
            x = torch.randn(3, 8)
            assert torch.equal(compiled(x), model(x))
    assert not dynamo["recompiles"]
    assert dynamo["stats"]["unique_graphs"] <= 2  # before and after the per-row layer


# -- batch invariance: the CPU only ----------------------------------------------------------------


def test_batch_invariance_is_kept_on_the_cpu_only(caplog) -> None:
    from worker.__main__ import ignored_settings
    from worker.batching import BatchEngine

    assert Settings().invariant_batches is True
    assert Settings(batch_invariant=True).invariant_batches is True
    assert Settings(batch_invariant=False).invariant_batches is False
    assert Settings(device="cuda").invariant_batches is False
    assert Settings(device="cuda", dtype="bfloat16", batch_invariant=True).invariant_batches is False
    # ...and the worker says so when it was asked for.
    (line,) = ignored_settings(Settings(device="cuda", batch_invariant=True))
    assert "IMAGEGEN_BATCH_INVARIANT=true is ignored" in line
    assert ignored_settings(Settings(device="cuda")) == ignored_settings(Settings(batch_invariant=True)) == []
    # The engine refuses it off the CPU whatever it is told: no per-row layers, batched decoding.
    runtime = _tiny()
    runtime.device = "cuda"  # nothing below touches the device
    with caplog.at_level(logging.WARNING, logger="worker.batching"):
        engine = BatchEngine.create(runtime, invariant=True)
    assert engine is not None and not engine.invariant and engine.batched_decode
    assert type(runtime.pipe.unet.time_embedding).__name__ != "Rowwise"
    assert any("CPU only" in r.getMessage() for r in caplog.records)


def test_bfloat16_rows_are_keyed_without_numpy() -> None:
    """numpy has no bfloat16: keying a row by `.numpy().tobytes()` raised TypeError at the warm-up."""
    import torch

    from worker.batching import _rowwise

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4).to(torch.bfloat16)
    rowwise = _rowwise(linear)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    x[2] = x[0]
    with torch.inference_mode():
        out = rowwise(x)
        alone = [linear(x[i : i + 1]) for i in range(3)]
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.cat(alone))
    assert len(rowwise.results) == 2  # the repeated row was computed once
    # Rows of other dtypes with the same bytes are other keys.
    with torch.inference_mode():
        rowwise.inner = linear.to(torch.float16)
        rowwise(x.view(torch.float16))
    assert len(rowwise.results) == 4


# -- generators ----------------------------------------------------------------------------------


def _cpu_only(generators: Any) -> list[str]:
    return [g.device.type for g in generators]


def test_the_pipeline_draws_with_cpu_generators_on_any_device() -> None:
    import diffusers

    from worker.runtime import DiffusersRuntime

    seen: dict[str, Any] = {}

    class Pipe:
        scheduler = diffusers.DDIMScheduler()

        def __call__(self, **kwargs: Any) -> Any:
            seen.update(kwargs)
            return SimpleNamespace(images=[])

    info = ModelInfo(name="fake", width=64, height=64, num_inference_steps=2, guidance_scale=7.5, scheduler="ddim")
    runtime = DiffusersRuntime(Pipe(), info, "cuda")
    runtime.generate(info.fill(GenerationParams(prompt="p", seed=7, num_images=3)), lambda step, total: None)
    assert _cpu_only(seen["generator"]) == ["cpu"] * 3
    assert [g.initial_seed() for g in seen["generator"]] == [7, 8, 9]


def test_the_engine_draws_with_cpu_generators_on_any_device() -> None:
    """On the meta device (which no generator serves): the noise is drawn on the CPU and moved."""
    import torch

    from worker.batching import BatchEngine

    runtime = _tiny()
    engine = BatchEngine(runtime)
    engine.device = torch.device("meta")
    params = _params(runtime, num_images=2)
    for text in (params.prompt, ""):  # the text encoder stays on the CPU: its embeddings given
        engine._embeddings[text] = torch.zeros(1, runtime.info.max_tokens, runtime.pipe.unet.config.cross_attention_dim)
    request = engine.start(params)
    assert _cpu_only(request.generators) == ["cpu", "cpu"] and request.latents.device.type == "meta"


def test_variations_draw_with_cpu_generators_on_any_device() -> None:
    from PIL import Image

    from app.core.variations import VariationParams
    from worker import variations

    seen: dict[str, Any] = {}
    pipe = object()
    info = ModelInfo(name="fake", width=64, height=64, num_inference_steps=2, guidance_scale=7.5, scheduler="ddim")
    runtime = SimpleNamespace(
        info=info,
        device="cuda",
        pipe=pipe,
        use_scheduler=lambda name: SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
    )
    variations._IMG2IMG[id(pipe)] = lambda **kwargs: seen.update(kwargs) or SimpleNamespace(images=[])
    try:
        sampler = variations.VariationSampler(runtime, Image.new("RGB", (64, 64)), embeds=False)
        sampler.generate(info.fill(VariationParams(seed=3, num_images=2)), lambda step, total: None)
    finally:
        del variations._IMG2IMG[id(pipe)]
    assert _cpu_only(seen["generator"]) == ["cpu", "cpu"]


# -- the start-up line -----------------------------------------------------------------------------


def test_the_worker_says_what_it_runs_on(monkeypatch) -> None:
    import torch

    from worker.__main__ import describe

    runtime = SimpleNamespace(pipe=SimpleNamespace(dtype=torch.float32))
    line = describe(Settings(max_batch=4), runtime)
    assert line == ("running on cpu, dtype float32, compile off, channels_last off, max batch 4, batch invariance on")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    runtime = SimpleNamespace(pipe=SimpleNamespace(dtype=torch.float16))
    line = describe(Settings(device="cuda", compile=True, channels_last=True, batch_invariant=True), runtime)
    assert line == (
        "running on cuda (NVIDIA H100 80GB HBM3), dtype float16, compile on, channels_last on, max batch 1, "
        "batch invariance off"
    )
