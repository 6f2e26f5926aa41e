"""Raw, in-process measurements for the benchmark: the pipeline called directly (or the batching
engine without the service around it), printed as one JSON line. Run by `bench.run` in a fresh
process per mode so that process-wide switches (oneDNN) never leak between figures."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROUNDS = 3  # turns per batch size (at least one call each)


def timed_calls(call: Callable[[], object], seconds: float, at_least: int) -> list[float]:
    """Seconds per call of `call`, repeated for `seconds` and at least `at_least` times."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < at_least or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """The model's diffusers pipeline as the raw figures use it (quiet, no progress bars)."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from diffusers.utils import logging as dlogging

    from models.registry import resolve

    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    pipe = AutoPipelineForText2Image.from_pretrained(resolve(model), torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["pipeline", "engine", "engine-noinv", "cold"], required=True)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per batch size, over all rounds")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    prompt = "a red circle on a blue background"

    def call(batch: int, steps: int = args.steps) -> None:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]  # as the worker draws
        with torch.inference_mode():
            pipe(prompt=[prompt] * batch, width=args.width, height=args.height, num_inference_steps=steps,
                 guidance_scale=args.guidance, generator=generators, output_type="pil")  # fmt: skip

    # Every call ends with PIL images on the host, so the GPU's queue is drained when a call returns.
    if args.mode == "cold":
        # What the worker does before it is ready: load, then one 1-step warm-up image (at --width/--height).
        call(1, steps=1)
        print("ready", flush=True)
        return

    run = call
    if args.mode != "pipeline":
        from app.core.config import Settings
        from app.core.jobs import GenerationParams
        from worker.batching import BatchEngine
        from worker.runtime import DiffusersRuntime

        runtime = DiffusersRuntime.load(Settings(model=args.model, device=args.device, dtype=args.dtype))
        rows = 2 * max(int(b) for b in args.batches.split(","))
        engine = BatchEngine.create(runtime, invariant=args.mode == "engine", max_rows=rows)
        assert engine is not None

        def run(batch: int, steps: int = args.steps) -> None:  # noqa: F811 - the engine's version
            params = [
                runtime.info.fill(GenerationParams(prompt=prompt, seed=i, width=args.width, height=args.height,
                                                   num_inference_steps=steps, guidance_scale=args.guidance))
                for i in range(batch)
            ]  # fmt: skip
            requests = [engine.start(p) for p in params]
            while not requests[0].done:
                engine.tick(requests)
            engine.decode_many(requests)  # as the worker decodes jobs finishing on the same step

    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        run(batch)  # warm-up
    # The batch sizes take turns, ROUNDS times: this machine's speed drifts from minute to minute,
    # and measuring each size in one stretch let the drift pick the "best" batch.
    times: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(ROUNDS):
        for batch in batches:
            times[batch] += timed_calls(lambda: run(batch), args.seconds / ROUNDS, at_least=1)  # noqa: B023
    results = {}
    for batch in batches:
        median = statistics.median(times[batch])
        results[batch] = {"images_per_s": batch / median, "call_ms": median * 1000, "calls": len(times[batch])}
        print(f"  {args.mode} batch {batch}: {batch / median:.2f} img/s ({median * 1000:.1f} ms/call)", file=sys.stderr)
    print(json.dumps({"mode": args.mode, "batches": results}))


if __name__ == "__main__":
    main()
