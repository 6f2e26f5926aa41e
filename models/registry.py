"""Model registry: names the service knows → where the pipeline comes from.

A name maps to a folder in this repo, to a builder that writes one on first use, or to a hub id
(real checkpoints, fetched into the model cache on GPU hosts; never used by tests); anything else
given as `IMAGEGEN_MODEL` is passed to diffusers as a folder path or hub id. An entry also carries
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
    """Folder path or hub id for `name`; builds registry models that are made in code."""
    entry = REGISTRY.get(name)
    if entry is None:
        return name
    if entry.folder is not None:
        if not (entry.folder / "model_index.json").exists():
            raise FileNotFoundError(f"model {name!r}: weights missing at {entry.folder}")
        return str(entry.folder)
    if entry.hub_id is not None:
        return entry.hub_id
    assert entry.builder is not None
    out = CACHE / name
    if not (out / "model_index.json").exists():
        import importlib
        import shutil
        import tempfile

        module, func = entry.builder.split(":")
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so two processes starting at once never see half a folder.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
        try:
            getattr(importlib.import_module(module), func)(tmp)
            tmp.rename(out)
        except OSError as exc:
            if not (out / "model_index.json").exists():  # not a lost race: a failed build, or a stray folder
                raise OSError(f"model {name!r}: could not build it into {out}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else a half-built or losing copy
    return str(out)
