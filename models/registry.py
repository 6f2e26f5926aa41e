"""Model registry: names the service knows → where the pipeline comes from.

A name maps to a folder in this repo, to a builder that writes one on first use (and again when
the builder's code changed), or to a hub id (real checkpoints, fetched into the model cache on GPU
hosts; never used by tests); anything else given as `IMAGEGEN_MODEL` is passed to diffusers as a
folder path or hub id (offline, only one that exists or is in the Hugging Face cache). An entry also carries
the model's family and request defaults, which the worker publishes with the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("IMAGEGEN_MODEL_CACHE") or ROOT.parent / ".data" / "models")  # empty: unset


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    folder: Path | None = None  # committed weights
    builder: str | None = None  # "module:function(out_dir)" that writes the folder
    hub_id: str | None = None  # a real checkpoint on the Hugging Face hub
    family: str | None = None  # "stable-diffusion", "sdxl", "kandinsky-2.2"; None: read off the pipeline
    # Request defaults (None: read off the pipeline or the folder's imagegen.json).
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    prior_num_inference_steps: int | None = None  # unCLIP prior (Kandinsky)
    prior_guidance_scale: float | None = None
    dtype: str | None = None  # preferred on CUDA unless IMAGEGEN_DTYPE says otherwise; CPU is float32
    variant: str | None = None  # weight files to fetch with that dtype ("fp16")

    def defaults(self) -> dict[str, Any]:
        """The entry's family and request defaults that are set (same keys as imagegen.json)."""
        keys = ("family", "width", "height", "num_inference_steps", "guidance_scale", "scheduler")
        keys += ("prior_num_inference_steps", "prior_guidance_scale")  # type: ignore[assignment]
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


SD_15 = ModelEntry(
    "sd-1.5",
    "Stable Diffusion 1.5 (512 px).",
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    family="stable-diffusion",
    width=512,
    height=512,
    num_inference_steps=25,
    guidance_scale=7.5,
    scheduler="dpmpp_2m",
    dtype="float16",
)

REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "tiny-shapes",
            "Tiny CLIP-conditioned pixel-space model trained on coloured shapes (32 px, CPU).",
            folder=ROOT / "weights" / "tiny-shapes",
        ),
        ModelEntry(
            "tiny-random",
            "Random-weight tiny Stable Diffusion pipeline (noise; for fast tests).",
            builder="models.tiny:build_tiny_random",
        ),
        ModelEntry(
            "tiny-sdxl",
            "Random-weight tiny SDXL pipeline (two text encoders; noise; for tests).",
            builder="models.tiny_families:build_tiny_sdxl",
        ),
        ModelEntry(
            "tiny-kandinsky",
            "Random-weight tiny Kandinsky 2.2 pipeline (unCLIP prior + decoder; noise; for tests).",
            builder="models.tiny_families:build_tiny_kandinsky",
        ),
        # SD 1.5's architecture with random weights, served with SD 1.5's defaults.
        replace(
            SD_15,
            name="sd15-random",
            description="Random-weight pipeline of Stable Diffusion 1.5's size (512 px; noise; for GPU benchmarks).",
            hub_id=None,
            builder="models.sd15:build_sd15_random",
        ),
        # Real checkpoints: downloaded once into the model cache (HF_HOME) on a GPU host.
        SD_15,
        ModelEntry(
            "sd-turbo",
            "SD-Turbo: distilled SD 2.1, 1-4 steps without guidance (512 px).",
            hub_id="stabilityai/sd-turbo",
            family="stable-diffusion",
            width=512,
            height=512,
            num_inference_steps=1,
            guidance_scale=0.0,
            dtype="float16",
            variant="fp16",
        ),
        ModelEntry(
            "sdxl",
            "Stable Diffusion XL base 1.0 (1024 px, two text encoders).",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            family="sdxl",
            width=1024,
            height=1024,
            num_inference_steps=30,
            guidance_scale=5.0,
            scheduler="euler",
            dtype="float16",
            variant="fp16",
        ),
        ModelEntry(
            "sdxl-turbo",
            "SDXL-Turbo: distilled SDXL, 1-4 steps without guidance (512 px).",
            hub_id="stabilityai/sdxl-turbo",
            family="sdxl",
            width=512,
            height=512,
            num_inference_steps=1,
            guidance_scale=0.0,
            dtype="float16",
            variant="fp16",
        ),
        ModelEntry(
            "kandinsky-2.2",
            "Kandinsky 2.2 (unCLIP: CLIP prior + image-embedding decoder; 768 px; image variations).",
            # The decoder's model card names its prior; AutoPipeline loads both as one combined pipeline.
            hub_id="kandinsky-community/kandinsky-2-2-decoder",
            family="kandinsky-2.2",
            width=768,
            height=768,
            num_inference_steps=50,
            guidance_scale=4.0,
            scheduler="ddim",
            prior_num_inference_steps=25,
            prior_guidance_scale=4.0,
            dtype="float16",
        ),
    )
}


def lookup(name: str) -> ModelEntry | None:
    """The registry entry for `name` (a folder path or hub id given directly has none)."""
    return REGISTRY.get(name)


def resolve(name: str) -> str:
    """Folder path or hub id for `name`; builds registry models that are made in code.

    Offline (`HF_HUB_OFFLINE`), a name that is no registry name, no existing path and no model in
    the Hugging Face cache is refused here with the known names (diffusers would only say that the
    "hub id" has no model_index.json).
    """
    entry = REGISTRY.get(name)
    if entry is None:
        if _offline() and _not_found_offline(name):
            from huggingface_hub import constants

            raise FileNotFoundError(
                f"model {name!r} is not a registry name ({', '.join(REGISTRY)}), not an existing folder, and not "
                f"in the Hugging Face cache ({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so nothing is downloaded"
            )
        return name
    if entry.folder is not None:
        if not (entry.folder / "model_index.json").exists():
            raise FileNotFoundError(f"model {name!r}: weights missing at {entry.folder}")
        return str(entry.folder)
    if entry.hub_id is not None:
        return entry.hub_id
    assert entry.builder is not None
    out = CACHE / name
    stamp = build_stamp(entry.builder)
    if _stamp_of(out) != stamp:
        _build(name, entry.builder, out, stamp)
    return str(out)


# A built folder records which builder code made it: the cache is keyed by name only, so a folder
# built before its builder (or the tokenizer) changed is rebuilt instead of served stale.
STAMP_FILE = ".imagegen-build"


def build_stamp(builder: str) -> str:
    """Hash of the builder's name and of the source of its module and of models/tokenizer.py."""
    import hashlib
    import importlib

    module = importlib.import_module(builder.split(":")[0])
    digest = hashlib.sha256(builder.encode())
    for source in (getattr(module, "__file__", None), ROOT / "tokenizer.py"):
        if source:
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _stamp_of(folder: Path) -> str | None:
    """The stamp of a complete build in `folder` ("" for one made before stamps), else None."""
    if not (folder / "model_index.json").exists():
        return None
    try:
        return (folder / STAMP_FILE).read_text().strip()
    except OSError:
        return ""


def _build(name: str, builder: str, out: Path, stamp: str) -> None:
    """Build into a hidden sibling folder, then rename it to `out`, so that processes starting at once
    never see half a folder; a stale build at `out` is moved aside first and deleted afterwards."""
    import contextlib
    import importlib
    import logging
    import shutil
    import tempfile

    module, func = builder.split(":")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    old: Path | None = None
    try:
        getattr(importlib.import_module(module), func)(tmp)
        (tmp / STAMP_FILE).write_text(stamp + "\n")
        if _stamp_of(out) not in (None, stamp):  # made by other builder code: replace it
            logging.getLogger(__name__).warning("model %r: %s was built by other code; rebuilt", name, out)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-old-"))
            with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
                out.rename(old)  # onto the empty placeholder (POSIX)
        tmp.rename(out)
    except OSError as exc:
        if _stamp_of(out) != stamp:  # not a lost race: a failed build, or a stray folder in the way
            raise OSError(f"model {name!r}: could not build it into {out}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else a half-built or losing copy
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _not_found_offline(name: str) -> bool:
    """True for a name that diffusers can only take as a hub id (no existing path) that the cache lacks."""
    if Path(name).expanduser().exists():
        return False
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "model_index.json")
    except HFValidationError:
        return False  # not a hub id either: diffusers says "neither a valid local path nor a valid repo id"
    return not isinstance(cached, str)
