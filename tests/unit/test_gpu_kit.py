"""scripts/gpu-kit.sh packs every package the benchmark imports on a GPU machine (directly or through
the packages it carries) that the machine's image lacks, so a lent GPU's few minutes are not spent
on an ImportError. The image's list is the one recorded for the `nvidia-h200` kind (2026-11-17)."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.imports import imported_modules

ROOT = Path(__file__).resolve().parents[2]
# What the GPU image already holds, of the packages this project's code can reach.
# fmt: off
IMAGE_PACKAGES = [
    "torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "numpy", "pillow", "httpx",
    "httpcore", "anyio", "h11", "idna", "certifi", "click", "tqdm", "prometheus-client", "pyyaml", "regex",
    "filelock", "fsspec", "packaging", "requests", "urllib3", "charset-normalizer", "typer", "shellingham", "rich",
    "markdown-it-py", "mdurl", "pygments", "zipp", "python-dateutil", "six", "uvloop", "psutil", "accelerate",
    "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "triton", "annotated-doc",
]
# fmt: on
IMAGE = {canonicalize_name(n) for n in IMAGE_PACKAGES}
LOCAL = {"app", "worker", "models", "bench", "tests", "imagegen_client"}
# On the GPU: the service (API, worker, model builders) and the benchmark with its process helpers.
SOURCES = [*ROOT.glob("app/**/*.py"), *ROOT.glob("worker/**/*.py"), *ROOT.glob("models/**/*.py"),
           *ROOT.glob("bench/**/*.py"), ROOT / "tests" / "procs.py"]  # fmt: skip


def _kit_packages() -> set[str]:
    script = (ROOT / "scripts" / "gpu-kit.sh").read_text()
    body = re.search(r"PACKAGES=\((.*?)\)", script, re.S)
    assert body is not None
    return {canonicalize_name(n) for n in body.group(1).split()}


def _imported_distributions() -> set[str]:
    by_module = md.packages_distributions()
    found: set[str] = set()
    for path in SOURCES:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in LOCAL:
                continue
            # A module no installed distribution provides can only be an optional import.
            found.update(canonicalize_name(d) for d in by_module.get(top, []))
    return found


def _needs(dist: str) -> set[str]:
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_machine": "x86_64", "extra": ""}  # fmt: skip
    out = set()
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.add(canonicalize_name(req.name))
    return out


def test_the_kit_carries_what_the_gpu_image_lacks() -> None:
    kit = _kit_packages()
    direct = _imported_distributions()
    assert {"diffusers", "fastapi", "rq", "redis", "pydantic-settings", "torch"} <= direct
    missing, todo, seen = set(), list(direct), set()
    while todo:
        dist = todo.pop()
        if dist in seen or dist in IMAGE:
            continue  # the image's own packages come with what they need
        seen.add(dist)
        if dist not in kit:
            missing.add(dist)
        todo.extend(_needs(dist))
    assert not missing, f"add to PACKAGES in scripts/gpu-kit.sh: {sorted(missing)}"
    assert not kit & IMAGE, "the kit need not carry what the image has"
