"""The `imagegen` command: generate images, show a job, cancel a job. Built on `imagegen_client.Client`.

Every failure prints one line to stderr and exits non-zero; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from imagegen_client.client import DEFAULT_URL, KEY_ENV, URL_ENV, Client, ImagegenError, Job, JobEvent, resolve_url

PROG = "imagegen"
EXIT_FAILED = 1  # the server refused, the job failed, or the files could not be written
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _size(value: str) -> tuple[int, int]:
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(width), int(height)


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def _seconds(value: str) -> float:
    number = _finite(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of seconds above 0")
    return number


def _job_id(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("a job id is required")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Generate images with an imagegen server.")
    url_help = f"server URL (default: ${URL_ENV} or {DEFAULT_URL})"
    key_help = f"API key, for a server that requires one (default: ${KEY_ENV}, which keeps it out of `ps`)"
    parser.add_argument("--url", help=url_help)
    parser.add_argument("--api-key", metavar="KEY", help=key_help)
    # Also accepted after the subcommand; SUPPRESS keeps it from overwriting the one given before.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=url_help)
    common.add_argument("--api-key", metavar="KEY", default=argparse.SUPPRESS, help=key_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="make images and save them as PNGs")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("-n", "--num-images", type=int, default=1, metavar="N", help="images to make (1-10)")
    gen.add_argument("--seed", type=int, help="random seed (image i uses seed + i); random if missing")
    gen.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from")
    gen.add_argument("--steps", type=int, dest="num_inference_steps", metavar="N", help="denoising steps")
    gen.add_argument("--guidance", type=_finite, dest="guidance_scale", metavar="G", help="guidance scale")
    gen.add_argument("--size", type=_size, metavar="WxH", help="image size, multiples of 8 (default: native)")
    gen.add_argument("--scheduler", help="sampler: ddim, euler, euler_a, dpmpp_2m, unipc, pndm, native")
    gen.add_argument("--priority", choices=["high", "normal", "low"], help="queue priority")
    gen.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="run again with the same KEY and arguments to get the job the first run made (for 24 h), not a new one",
    )
    gen.add_argument(
        "-o", "--output", type=Path, default=Path("."), metavar="DIR", help="folder for the PNGs (not -: no stdout)"
    )
    gen.add_argument("--timeout", type=_seconds, default=600.0, metavar="S", help="give up waiting after S seconds")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    status = sub.add_parser("status", parents=[common], help="print a job as JSON")
    status.add_argument("job_id", type=_job_id)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id", type=_job_id)
    return parser


class _Bar:
    """A tqdm bar that follows a job's events: total = steps, postfix = status."""

    def __init__(self, job_id: str, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total or None, desc=job_id[:8], unit="step", file=sys.stderr, disable=not enabled, leave=True
        )

    def __call__(self, event: JobEvent) -> None:
        if event.progress.total and self.bar.total != event.progress.total:
            self.bar.total = event.progress.total
        self.bar.n = event.progress.step
        self.bar.set_postfix_str(event.status, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _generate(client: Client, args: argparse.Namespace) -> int:
    width, height = args.size if args.size else (None, None)
    job = client.submit(
        args.prompt,
        num_images=args.num_images,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        width=width,
        height=height,
        scheduler=args.scheduler,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
    )
    bar = _Bar(job.id, job.progress.total, enabled=not args.quiet)
    try:
        done = client.wait(job.id, timeout=args.timeout, on_progress=bar)
    except KeyboardInterrupt:
        bar.close()
        return _interrupted(client, job.id, args)
    finally:
        bar.close()
    return _save(client, done, args)


def _interrupted(client: Client, job_id: str, args: argparse.Namespace) -> int:
    """Ctrl-C while waiting: nobody wants the result any more, so free the worker, and say what
    the server did. A job that had already ended is reported as such (its images are saved: the
    command's work is done after all)."""
    try:
        job = client.cancel(job_id)
    except ImagegenError as exc:
        ended = _ended(client, job_id) if exc.status == 409 else None  # 409: it ended before the cancel
        if ended is None:
            print(f"{PROG}: interrupted; job {job_id} may go on running (cancel failed: {exc})", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"{PROG}: interrupted, but job {job_id} had already {ended.status}", file=sys.stderr)
        return _save(client, ended, args) if ended.succeeded else EXIT_INTERRUPTED
    if job.status == "canceled":
        print(f"{PROG}: interrupted; canceled job {job_id}", file=sys.stderr)
    else:  # 202: it was running and stops at its next denoising step
        print(f"{PROG}: interrupted; asked job {job_id} to cancel (it stops at its next step)", file=sys.stderr)
    return EXIT_INTERRUPTED


def _ended(client: Client, job_id: str) -> Job | None:
    try:
        job = client.get(job_id)
    except ImagegenError:
        return None
    return job if job.done else None


def _save(client: Client, done: Job, args: argparse.Namespace) -> int:
    done.raise_for_status()
    args.output.mkdir(parents=True, exist_ok=True)
    for image in done.images:
        path = args.output / f"{done.id}-{image.index}.png"
        path.write_bytes(client.download(done.id, image.index))
        print(path)
    return 0


def _status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.get(args.job_id).raw, indent=2))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    if job.status == "canceled":
        print(f"{job.id}: canceled")
    else:
        print(f"{job.id}: cancel requested ({job.status}; it stops at its next step)")
    return 0


COMMANDS: dict[str, Any] = {"generate": _generate, "status": _status, "cancel": _cancel}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    if args.command == "generate" and str(args.output) == "-":  # not a folder named "-"
        parser.error("-o -: PNGs cannot go to stdout; give a folder (the PNGs' paths are printed)")
    if args.command == "generate" and args.output.exists() and not args.output.is_dir():
        parser.error(f"-o {args.output}: exists and is not a folder")  # before any job is submitted
    notices = logging.StreamHandler(sys.stderr)  # the client's own (a submission being retried)
    notices.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    library = logging.getLogger("imagegen_client")
    library.addHandler(notices)
    try:
        with Client(args.url, api_key=args.api_key) as client:
            return int(COMMANDS[args.command](client, args))
    except ImagegenError as exc:
        later = f"; the server asks to retry in {exc.retry_after:g} s" if exc.retry_after is not None else ""
        print(f"{PROG}: error: {exc}{later}", file=sys.stderr)
        if exc.code == "validation_error":  # the server refused an argument's value (e.g. -n 0)
            return EXIT_USAGE
    except OSError as exc:  # the output folder or a file could not be written
        print(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an odd answer: still one line, never a traceback
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        library.removeHandler(notices)
    return EXIT_FAILED
