"""`make bench`: the service measured against the raw pipeline, every figure from the same run.

1. raw: the pipeline called in-process at batch 1 and at its best batch size (images/s); also the
   batching engine alone, with and without the batch-invariance switches (their cost).
2. load: 16 concurrent HTTP clients → API → Redis → one worker (2 CPU threads, or the GPU with
   `--device cuda`): images/s in the steady state, p50/p95, against the raw best batch measured
   right before and after.
3. idle: one job at a time, POST → long-poll → PNG in hand, minus the raw single-image time
   (measured in this process between the jobs).
4. ingress: POST /generate with no worker, driven by wrk, next to a trivial FastAPI endpoint.
5. cold start: worker start → registered with RQ, against from_pretrained + one warm-up image.

Prints a table and writes bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from app.core import metrics
from bench.raw import timed_calls
from models.registry import CACHE as MODEL_CACHE
from tests.procs import PYTHON, ROOT, Proc, free_port, service_env, spawn, start_redis, wait_for
from worker.__main__ import PIN_VARIABLES, pin_threads

RESULTS = ROOT / "bench" / "results"
# Fixed parameters per model (each model's native scheduler; guidance on, so CFG doubles the UNet rows).
MODEL_PARAMS = {
    "tiny-random": {"width": 64, "height": 64, "num_inference_steps": 10, "guidance_scale": 7.5},
    "tiny-shapes": {"width": 32, "height": 32, "num_inference_steps": 20, "guidance_scale": 7.5},
    "sd15-random": {"width": 512, "height": 512, "num_inference_steps": 25, "guidance_scale": 7.5},  # GPU
}
# Batch sizes tried for "raw best batch" (the slower models stop at 16 to keep the run short).
MODEL_BATCHES = {"tiny-shapes": "1,4,8,16", "sd15-random": "1,2,4,8,16"}
PROMPT = "a red circle on a blue background"
TERMINAL = ("succeeded", "failed", "canceled")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- 1. raw ------------------------------------------------------------------------------------


def raw(model: str, params: dict[str, Any], mode: str, batches: str, cli: argparse.Namespace) -> dict[str, Any]:
    args = [PYTHON, "-m", "bench.raw", "--mode", mode, "--model", model, *_where(cli)]
    args += ["--batches", batches, "--seconds", str(cli.seconds), "--width", str(params["width"])]
    args += ["--height", str(params["height"]), "--steps", str(params["num_inference_steps"])]
    args += ["--guidance", str(params["guidance_scale"])]
    out = subprocess.run(args, cwd=ROOT, env=_env(cli), capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    batches_ = {int(k): v for k, v in result["batches"].items()}
    best = max(batches_, key=lambda b: batches_[b]["images_per_s"])
    return {
        "by_batch": batches_,
        "batch1_images_per_s": batches_[1]["images_per_s"],
        "batch1_ms": batches_[1]["call_ms"],
        "best_batch": best,
        "best_images_per_s": batches_[best]["images_per_s"],
    }


def _where(cli: argparse.Namespace) -> list[str]:
    """bench.raw's arguments for the threads, device and dtype the run measures."""
    return ["--threads", str(cli.threads), "--device", cli.device, "--dtype", cli.dtype]


def _env(cli: argparse.Namespace) -> dict[str, str]:
    """The environment of the raw runs and the services: with `--pin` on the CPU, torch's threads
    bound to cores as the workers' are (`worker.__main__.pin_threads`), so that both sides run
    alike; with `--no-pin`, binding the shell asked for (OMP_PROC_BIND, OMP_PLACES) is dropped too."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    pin_threads(cli.pin and cli.device == "cpu", env)
    return unpin(env, cli.pin and cli.device == "cpu")


def unpin(env: dict[str, str], pinned: bool) -> dict[str, str]:
    """`env` without the shell's own thread binding when the run is not pinned (a worker leaves
    OMP_PROC_BIND/OMP_PLACES as it finds them, so `--no-pin` would not have meant unpinned)."""
    return env if pinned else {k: v for k, v in env.items() if k not in PIN_VARIABLES}


# -- services ----------------------------------------------------------------------------------


def start_api(env: dict[str, str], log_path: Path, app: str = "app.main:app") -> tuple[Proc, str]:
    """One uvicorn process, as `make run` starts it (no access log)."""
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    proc = spawn(args, log_path, env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(proc.output()[-2000:])
        return httpx.get(base + "/docs", timeout=1).status_code == 200

    wait_for(up, 30, f"{app} up")
    return proc, base


def start_worker(env: dict[str, str], log_path: Path, conn: redis.Redis) -> tuple[Proc, float]:
    """Spawn `python -m worker`; returns it and the seconds until it registered with RQ."""
    before = conn.scard("rq:workers")
    t0 = time.perf_counter()
    proc = spawn([PYTHON, "-m", "worker"], log_path, env)
    while conn.scard("rq:workers") <= before:
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.output()[-3000:]}")
        if time.perf_counter() - t0 > 180:
            raise TimeoutError("worker not ready")
        time.sleep(0.01)
    return proc, time.perf_counter() - t0


def one_job(http: httpx.Client, body: dict[str, Any]) -> float:
    """POST with `Prefer: wait` and `Accept: image/png` (answered with the PNG when the job ends in
    time; else the job, then a long-poll and the PNG's URL) → PNG in hand; returns the seconds."""
    t0 = time.perf_counter()
    r = http.post("/generate", json=body, headers={"Prefer": "wait=30", "Accept": "image/png"})
    if r.status_code == 200 and r.headers.get("content-type") == "image/png":
        png = r
    else:
        if r.status_code not in (200, 202):
            raise RuntimeError(f"POST /generate: {r.status_code} {r.text[:200]}")
        job = r.json()
        while job["status"] not in TERMINAL:
            job = http.get(f"/jobs/{job['id']}", params={"wait": 30}).json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
        png = http.get(job["images"][0]["url"])
    if png.status_code != 200 or not png.content.startswith(b"\x89PNG"):
        raise RuntimeError(f"POST /generate → PNG: {png.status_code} {png.text[:200]}")
    return time.perf_counter() - t0


def load(
    base: str, params: dict[str, Any], clients: int, jobs: int, warmup: int, conn: redis.Redis | None = None
) -> dict[str, Any]:
    """Closed loop: each client submits its next job once it holds the previous one's PNG.

    Throughput is measured in the steady state: over the window between the `warmup`-th and the
    `warmup + jobs`-th completion, with every client still submitting until the window closes (the
    jobs in flight then finish outside it). Counting up to the last job instead would take in the
    drain, where fewer and fewer clients are left and the batch empties; that figure is kept as
    `span_images_per_s`. With `conn`, the worker's `imagegen_batch_jobs` histogram is read as the
    window opens and closes: how many jobs its steps held in between, on average.
    """
    lock = threading.Lock()
    done_at: list[float] = []  # completion times, in order
    spans: list[tuple[int, float, float]] = []  # (job number, submitted, PNG in hand) of every job
    errors: list[str] = []
    submitted = iter(range(1 << 30))
    target = warmup + jobs
    tallies: list[tuple[float, float]] = []  # (steps, jobs summed over them) at the window's ends

    def tally() -> None:
        if conn is not None:
            buckets, total = metrics.read_histogram(conn, metrics.BATCH_JOBS, metrics.BATCH_BUCKETS)
            tallies.append((buckets[-1][1], total))  # the +Inf bucket holds every step

    def client() -> None:
        # Plain HTTP on loopback: no TLS context (loading the CA bundle costs ~40 ms of CPU per client).
        with httpx.Client(base_url=base, timeout=60, verify=False) as http:
            while True:
                with lock:
                    if len(done_at) >= target or len(errors) > jobs:
                        return
                    i = next(submitted)
                try:
                    took = one_job(http, {"prompt": f"{PROMPT} {i}", "seed": i, **params})
                except Exception as exc:  # counted and reported
                    with lock:
                        errors.append(str(exc))
                    continue
                end = time.perf_counter()
                with lock:
                    done_at.append(end)
                    spans.append((i, end - took, end))
                    if len(done_at) in (warmup, target):
                        tally()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(done_at) < target:
        raise RuntimeError(f"{len(errors)} jobs failed under load, e.g. {errors[:3]}")
    opened, closed = done_at[warmup - 1], done_at[target - 1]
    latencies = [end - begin for _, begin, end in spans if opened < end <= closed]
    # As measured before the window (runs A–M): every job after the warm-up ones, from the first one's
    # submission to the last PNG, the drain included.
    after = [(begin, end) for i, begin, end in spans if i >= warmup]
    span_wall = max(end for _, end in after) - min(begin for begin, _ in after)
    steps = tallies[1][0] - tallies[0][0] if len(tallies) == 2 else 0.0
    return {
        "jobs_per_step": (tallies[1][1] - tallies[0][1]) / steps if steps else None,
        "clients": clients,
        "jobs": len(latencies),
        "errors": len(errors),
        "error_sample": errors[:3],
        "images_per_s": len(latencies) / (closed - opened),
        "span_images_per_s": len(after) / span_wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p95_ms": pct(latencies, 95) * 1000,
    }


class RawOne:
    """The raw pipeline in this process, loaded once per model: the idle-latency baseline is
    measured between the service's jobs, and the best batch's throughput right before and after
    each load phase, because this machine's speed drifts from minute to minute (a baseline from the
    start of the run can be off by more than the overhead)."""

    def __init__(self, model: str, params: dict[str, Any], cli: argparse.Namespace) -> None:
        self.model, self.params, self.threads = model, params, cli.threads
        self.device, self.dtype = cli.device, cli.dtype
        self.pipe: Any = None

    def __call__(self, seed: int, batch: int = 1) -> float:
        import torch

        if self.pipe is None:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            from bench.raw import load_pipeline

            self.pipe = load_pipeline(self.model, self.device, self.dtype)
        torch.set_num_threads(self.threads)
        p = self.params
        t0 = time.perf_counter()
        with torch.inference_mode():
            generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]  # as the worker draws
            self.pipe(prompt=[PROMPT] * batch, width=p["width"], height=p["height"], generator=generator,
                      num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"])  # fmt: skip
        return time.perf_counter() - t0

    def throughput(self, batch: int, seconds: float) -> float:
        """Images/s at `batch`: the median of the calls made in `seconds` (at least 2), after a warm-up."""
        self(0, batch)
        return batch / statistics.median(timed_calls(lambda: self(0, batch), seconds, at_least=2))


def idle(base: str, params: dict[str, Any], n: int, raw_one: RawOne) -> dict[str, Any]:
    """One job at a time through the service, each followed by the same image from the raw pipeline."""
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(3):
            one_job(http, {"prompt": PROMPT, "seed": 10_000 + i, **params})
            raw_one(10_000 + i)
        times, raw_times = [], []
        for i in range(n):
            time.sleep(0.02)  # the raw call's idle OpenMP threads spin for a while: not the service's cost
            times.append(one_job(http, {"prompt": PROMPT, "seed": 20_000 + i, **params}))
            raw_times.append(raw_one(20_000 + i))
    return {
        "jobs": n,
        "p50_ms": pct(times, 50) * 1000,
        "p95_ms": pct(times, 95) * 1000,
        "raw_p50_ms": pct(raw_times, 50) * 1000,
        # Each job against the raw call right after it: drift between minutes mostly cancels out.
        "paired_p50_ms": pct([t - r for t, r in zip(times, raw_times, strict=True)], 50) * 1000,
    }


# -- 4. ingress --------------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(url: str, connections: int, seconds: int, script: str = "post.lua") -> dict[str, Any]:
    script = ROOT / "bench" / script
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for q, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[q] = float(value) * UNITS[unit]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "requests_per_s": rps,
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


# -- 5. cold start -----------------------------------------------------------------------------


def raw_cold(model: str, params: dict[str, Any], cli: argparse.Namespace) -> float:
    """from_pretrained (onto the device) + one 1-step image at the model's benchmark size, in a fresh process."""
    t0 = time.perf_counter()
    args = [PYTHON, "-m", "bench.raw", "--mode", "cold", "--model", model, *_where(cli)]
    args += ["--width", str(params["width"]), "--height", str(params["height"])]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(cli), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            took = time.perf_counter() - t0
            break
    else:
        raise RuntimeError("raw cold start did not finish")
    proc.wait()
    return took


# -- the run -----------------------------------------------------------------------------------


def bench_model(
    model: str, args: argparse.Namespace, tmp: Path, server: Any, out: dict[str, Any], save: Callable[[], None]
) -> None:
    """Every figure of one model, into `out`; `save` is called after each phase (the results so far
    survive a run that is cut short, e.g. by a GPU lease's time limit)."""
    params = MODEL_PARAMS[model]
    gpu = args.device != "cpu"
    out.update(model=model, params=params)
    log(f"[{model}] 1. raw pipeline and engine ({args.device}, {args.dtype}, {args.threads} threads)")
    batches = MODEL_BATCHES.get(model, args.batches) if not args.quick else args.batches
    out["raw"] = raw(model, params, "pipeline", batches, args)
    if gpu:  # the invariance switches are CPU-only (a CUDA worker runs without them)
        out["engine_no_invariance"] = raw(model, params, "engine-noinv", batches, args)
    else:
        out["engine"] = raw(model, params, "engine", batches, args)
        out["engine_no_invariance"] = raw(model, params, "engine-noinv", batches, args)
    save()

    conn = server.client(0)
    conn.flushdb()
    # The workers load the model the raw phase built (runs up to P built tiny-random again in the
    # run's own cache at the first cold start, which put half a build into that median of two).
    settings = {"threads": str(args.threads), "device": args.device, "dtype": args.dtype, "log_level": "WARNING"}
    settings["pin_threads"] = str(args.pin and not gpu).lower()
    env = service_env(server.url, tmp, model=model, worker_heartbeat="5", model_cache=str(MODEL_CACHE), **settings)
    env.pop("IMAGEGEN_WEBHOOK_SECRET", None)
    env = unpin(env, args.pin and not gpu)

    log(f"[{model}] 5. cold start ({args.cold} runs each)")
    cold_worker, cold_raw = [], []
    for i in range(args.cold):
        cold_raw.append(raw_cold(model, params, args))
        proc, took = start_worker(env | {"IMAGEGEN_MAX_BATCH": str(args.max_batch)}, tmp / f"cold{i}.log", conn)
        cold_worker.append(took)
        proc.stop(signal.SIGKILL)
        conn.flushdb()
    out["cold"] = {"worker_s": statistics.median(cold_worker), "raw_s": statistics.median(cold_raw)}
    save()

    # The slower model and the one-at-a-time reference get fewer jobs (the figures settle quickly).
    jobs = args.jobs if model == "tiny-random" or gpu else max(args.clients * 2, args.jobs // 2)
    api, base = start_api(env, tmp / f"api-{model}.log")
    raw_one = RawOne(model, params, args)
    try:
        # With MAX_BATCH=N: the figure the targets are about (2 threads, batch-invariant on the CPU),
        # one torch thread (leaving a core to the API, Redis and the clients), and invariance off.
        # With 1: the one-job path, for reference. A GPU runs the first two alone, without invariance.
        variants = [(1, args.threads, not gpu), (args.max_batch, args.threads, not gpu)]
        if args.threads > 1 and not args.quick and not gpu:
            variants.append((args.max_batch, 1, True))
        if not args.quick and not gpu:
            variants.append((args.max_batch, args.threads, False))
        for max_batch, threads, invariant in variants:
            key = f"max_batch_{max_batch}" + ("" if threads == args.threads else f"_threads_{threads}")
            key += "" if invariant or gpu else "_not_invariant"
            n = jobs if max_batch > 1 else max(args.clients * 2, jobs // 2)
            log(f"[{model}] 2-3. service, {key} ({threads} threads): load, then idle")
            worker_env = env | {
                "IMAGEGEN_MAX_BATCH": str(max_batch),
                "IMAGEGEN_THREADS": str(threads),
                "IMAGEGEN_BATCH_INVARIANT": str(invariant).lower(),
            }
            worker, _ = start_worker(worker_env, tmp / f"worker-{key}.log", conn)
            try:
                # The raw best batch right before and after the load phase, as its baseline.
                best = out["raw"]["best_batch"]
                before = raw_one.throughput(best, args.seconds)
                loaded = load(base, params, args.clients, n, warmup=args.clients, conn=conn)
                after = raw_one.throughput(best, args.seconds)
                loaded["raw_alongside"] = {"batch": best, "before": before, "after": after}
                out[key] = {"load": loaded, "idle": idle(base, params, args.idle, raw_one)}
                save()
            finally:
                worker.stop()
                conn.delete("rq:workers")
    finally:
        api.stop()


INGRESS_ROUNDS = 2


def ingress(args: argparse.Namespace, tmp: Path, server: Any) -> dict[str, Any]:
    log("4. ingress (no worker running)")
    conn = server.client(0)
    conn.flushdb()
    env = service_env(server.url, tmp, model="tiny-random")
    env.pop("IMAGEGEN_WEBHOOK_SECRET", None)
    env.update(IMAGEGEN_MAX_QUEUE="10000000", IMAGEGEN_LOG_LEVEL="WARNING")
    # Alternated, best of INGRESS_ROUNDS each: the machine's speed drifts between minutes by more
    # than the difference measured, and a run can only be slowed by it, never sped up.
    result: dict[str, Any] = {}
    for _ in range(INGRESS_ROUNDS):
        # "keyed": each request with an Idempotency-Key of its own, as the Python client sends.
        for name, app, script in (
            ("api", "app.main:app", "post.lua"),
            ("keyed", "app.main:app", "post_keyed.lua"),
            ("trivial", "bench.trivial_app:app", "post.lua"),
        ):
            proc, base = start_api(env, tmp / f"ingress-{name}.log", app)
            try:
                wrk(base + "/generate", args.connections, 2, script)  # warm-up
                got = wrk(base + "/generate", args.connections, args.wrk_seconds, script)
            finally:
                proc.stop()
            conn.flushdb()
            if name not in result or got["requests_per_s"] > result[name]["requests_per_s"]:
                result[name] = got
    return result


def args_max_batch(results: dict[str, Any]) -> int:
    return int(results["args"]["max_batch"])


def table(results: dict[str, Any]) -> str:
    rows = ["| figure | measured | target |", "|---|---|---|"]
    ing = results.get("ingress")
    for m in results["models"]:
        name, raw_, eng, noinv = m["model"], m["raw"], m.get("engine"), m["engine_no_invariance"]
        p = m["params"]
        rows.append(f"| **{name}** ({p['width']}×{p['height']}, {p['num_inference_steps']} steps, CFG) | | |")
        one = f"{raw_['batch1_images_per_s']:.2f} img/s ({raw_['batch1_ms']:.0f} ms per image)"
        rows.append(f"| raw pipeline, batch 1 | {one} | |")
        rows.append(f"| raw pipeline, best batch ({raw_['best_batch']}) | {raw_['best_images_per_s']:.2f} img/s | |")
        if eng is not None:  # CPU runs only
            rows.append(
                f"| engine alone, best batch ({eng['best_batch']}), batch-invariant | "
                f"{eng['best_images_per_s']:.2f} img/s (batch 1: {eng['batch1_images_per_s']:.2f}) | |"
            )
        rows.append(
            f"| engine alone, best batch ({noinv['best_batch']}), without the invariance switches | "
            f"{noinv['best_images_per_s']:.2f} img/s (batch 1: {noinv['batch1_images_per_s']:.2f}) | |"
        )
        for key in sorted(k for k in m if k.startswith("max_batch_")):
            ld, idl = m[key]["load"], m[key]["idle"]
            mb = key.removeprefix("max_batch_").replace("_threads_", ", threads=")
            mb = mb.replace("_not_invariant", ", not batch-invariant")
            ratio_best = ld["images_per_s"] / raw_["best_images_per_s"]
            along = ld.get("raw_alongside")
            alongside = ""
            if along is not None:
                mean = (along["before"] + along["after"]) / 2
                alongside = (
                    f"; raw batch {along['batch']} just before and after: {along['before']:.2f} / {along['after']:.2f}"
                    f" img/s, **{ld['images_per_s'] / mean:.2f}×** their mean"
                )
            ratio_1 = ld["images_per_s"] / raw_["batch1_images_per_s"]
            targets = {"1": "(one job at a time, for reference)", str(args_max_batch(results)): "≥ 0.9× raw best batch"}
            target = targets.get(mb, "(variant)")
            rows.append(
                f"| service under load, MAX_BATCH={mb}: {ld['clients']} clients, {ld['jobs']} jobs | "
                f"{ld['images_per_s']:.2f} img/s = {ratio_best:.2f}× raw best, {ratio_1:.2f}× raw batch 1"
                f" (whole span with the drain: {ld['span_images_per_s'] / raw_['best_images_per_s']:.2f}×){alongside}; "
                f"p50 {ld['p50_ms']:.0f} ms, p95 {ld['p95_ms']:.0f} ms, errors {ld['errors']}"
                + (f"; {ld['jobs_per_step']:.1f} jobs per step" if ld.get("jobs_per_step") else "")
                + f" | {target} |"
            )
            overhead = idl["p50_ms"] - idl["raw_p50_ms"]
            rows.append(
                f"| idle latency, MAX_BATCH={mb} (POST → PNG) | p50 {idl['p50_ms']:.1f} ms, p95 {idl['p95_ms']:.1f} ms;"
                f" raw batch 1 alongside: p50 {idl['raw_p50_ms']:.1f} ms; overhead: **{overhead:+.1f} ms**"
                f" (p50 of each job minus its raw call: {idl.get('paired_p50_ms', math.nan):+.1f} ms) |"
                " overhead ≤ 15 ms |"
            )
        cold = m["cold"]
        rows.append(
            f"| cold start: worker start → ready | {cold['worker_s']:.2f} s vs raw {cold['raw_s']:.2f} s = "
            f"{cold['worker_s'] / cold['raw_s']:.2f}× | ≤ 1.2× raw |"
        )
    if ing is None:  # --no-ingress
        return "\n".join(rows)
    api, triv = ing["api"], ing["trivial"]
    rows.append("| **ingress** (wrk, 1 API process, no worker) | | |")
    rows.append(
        f"| POST /generate | {api['requests_per_s']:.0f} req/s = {api['requests_per_s'] / triv['requests_per_s']:.2f}×"
        f" trivial; p50 {api['p50_ms']:.1f} ms, p99 {api['p99_ms']:.1f} ms; non-2xx {api['non_2xx']} |"
        " ≥ 0.75× trivial, p99 ≤ 50 ms |"
    )
    if "keyed" in ing:  # results written before it was measured lack it
        keyed = ing["keyed"]
        rows.append(
            f"| POST /generate, each with an Idempotency-Key | {keyed['requests_per_s']:.0f} req/s ="
            f" {keyed['requests_per_s'] / api['requests_per_s']:.2f}× without; p50 {keyed['p50_ms']:.1f} ms,"
            f" p99 {keyed['p99_ms']:.1f} ms; non-2xx {keyed['non_2xx']} | |"
        )
    rows.append(
        f"| trivial FastAPI endpoint | {triv['requests_per_s']:.0f} req/s; p50 {triv['p50_ms']:.1f} ms,"
        f" p99 {triv['p99_ms']:.1f} ms | |"
    )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-random,tiny-shapes", help="skipped when the weights are missing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: torch threads bound to cores, in the workers (IMAGEGEN_PIN_THREADS) and the raw runs alike",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the pipeline and worker run")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="half needs cuda")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--seconds", type=float, default=2.0, help="raw: seconds per batch size (at least 3 calls)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=96)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--cold", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--wrk-seconds", type=int, default=8)
    ap.add_argument("--ingress", action=argparse.BooleanOptionalAction, default=True, help="measure ingress (wrk)")
    ap.add_argument("--quick", action="store_true", help="small counts, for trying the benchmark out")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.seconds, args.jobs, args.idle, args.cold, args.wrk_seconds = "1,8,16", 1, 32, 8, 1, 3
    if args.ingress and shutil.which("wrk") is None:
        print("wrk is missing: apt-get install -y wrk (or --no-ingress)", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.dtype != "float32":
        print("--dtype float16/bfloat16 needs --device cuda", file=sys.stderr)
        return 2
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, no GPU"
    if args.device == "cuda":
        import torch

        machine = machine.replace("no GPU", torch.cuda.get_device_name(0))

    from models.registry import REGISTRY

    models = []
    for name in filter(None, args.models.split(",")):  # --models '' measures ingress alone
        entry = REGISTRY.get(name)
        if entry is not None and entry.folder is not None and not (entry.folder / "model_index.json").exists():
            log(f"skipping {name}: no weights at {entry.folder}")
            continue
        models.append(name)

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as d:
        tmp = Path(d)
        server = start_redis(tmp / "redis")
        try:
            results: dict[str, Any] = {
                "machine": machine,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "args": vars(args),
                "models": [],
            }

            def save() -> None:  # partial results survive an interrupted run
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / "partial.json").write_text(json.dumps(results, indent=2))

            for m in models:
                results["models"].append({})
                bench_model(m, args, tmp, server, results["models"][-1], save)
            if args.ingress:
                results["ingress"] = ingress(args, tmp, server)
        finally:
            server.proc.stop()
    results["seconds"] = round(time.time() - started, 1)
    text = table(results)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results | {"table": text}, indent=2))
    log(f"wrote {RESULTS / 'latest.json'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
