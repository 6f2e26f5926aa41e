"""How batch-invariant the batching engine is, with and without its switches (`python -m bench.invariance`).

For N requests (mixed samplers, step counts, guidance with and without CFG, one size) it compares
the final latents of each request run alone with the same request run inside one batch, and the PNG
bytes of the one-job pipeline path (IMAGEGEN_MAX_BATCH=1) with those of the engine, decoded as a
batching worker decodes them (the requests that finish on the same step together). Each mode runs
in a fresh process, because the switches are process-wide.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

from tests.procs import PYTHON, ROOT

SCHEDULERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "pndm"]


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    from app.core.config import Settings
    from app.core.jobs import GenerationParams, Scheduler
    from worker.batching import BatchEngine
    from worker.png import encode_png
    from worker.runtime import DiffusersRuntime

    runtime = DiffusersRuntime.load(Settings(model=args.model))
    params = [
        runtime.info.fill(
            GenerationParams(
                prompt=f"request {i}",
                seed=1000 + i,
                width=args.size,
                height=args.size,
                num_inference_steps=8 + i % 5,
                guidance_scale=[7.5, 1.0, 3.0][i % 3],
                scheduler=Scheduler(SCHEDULERS[i % len(SCHEDULERS)]),
            )
        )
        for i in range(args.n)
    ]
    out: dict[str, object] = {}
    if args.mode == "pipeline":
        # The one-job path exactly as IMAGEGEN_MAX_BATCH=1 runs it.
        pngs = [encode_png(runtime.generate(p, lambda s, t: None)[0], p, p.seed or 0) for p in params]
    else:
        engine = BatchEngine.create(runtime, invariant=args.mode == "engine")
        assert engine is not None
        alone = []
        for p in params:
            r = engine.start(p)
            while not r.done:
                engine.tick([r])
            alone.append(r)
        # As a batching worker runs them: every unfinished request in each step, and the ones that
        # finish on the same step decoded together (`decode_many`), as it serves them.
        together = [engine.start(p) for p in params]
        batched: dict[int, object] = {}
        while not all(r.done for r in together):
            engine.tick([r for r in together if not r.done])
            finished = [i for i, r in enumerate(together) if r.done and i not in batched]
            if finished:
                for i, images in zip(finished, engine.decode_many([together[i] for i in finished]), strict=True):
                    batched[i] = images[0]
        out["max_abs_diff_alone_vs_batched"] = max(
            float((a.latents - b.latents).abs().max()) for a, b in zip(alone, together, strict=True)
        )
        out["png_equal_alone_vs_batched"] = sum(
            engine.decode(a)[0].tobytes() == batched[i].tobytes()
            for i, a in enumerate(alone)  # type: ignore[attr-defined]
        )
        pngs = [encode_png(batched[i], p, p.seed or 0) for i, p in enumerate(params)]  # type: ignore[arg-type]
    out["png_sha256"] = [hashlib.sha256(b).hexdigest() for b in pngs]
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["pipeline", "engine", "engine-noinv"])
    args = ap.parse_args()
    if args.mode:
        child(args)
        return 0
    results = {}
    for mode in ("pipeline", "engine", "engine-noinv"):
        cmd = [PYTHON, "-m", "bench.invariance", "--mode", mode, "--model", args.model, "--n", str(args.n)]
        cmd += ["--size", str(args.size), "--threads", str(args.threads)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    pipe = results["pipeline"]["png_sha256"]
    print(f"{args.model}, {args.n} requests at {args.size}px, {args.threads} threads")
    for mode in ("engine", "engine-noinv"):
        r = results[mode]
        same = sum(a == b for a, b in zip(pipe, r["png_sha256"], strict=True))
        print(
            f"  {mode:13s} alone vs batched: max |Δlatent| {r['max_abs_diff_alone_vs_batched']:.1e}, "
            f"identical images {r['png_equal_alone_vs_batched']}/{args.n}; "
            f"PNG bytes equal to the MAX_BATCH=1 path: {same}/{args.n}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
