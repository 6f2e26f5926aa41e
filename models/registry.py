"""Model registry: names the service knows → where the pipeline comes from.

A name maps to a folder in this repo or to a builder that writes one on first use; anything
else given as `IMAGEGEN_MODEL` is passed to diffusers as a folder path or hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("IMAGEGEN_MODEL_CACHE", ROOT.parent / ".data" / "models"))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    folder: Path | None = None  # committed weights
    builder: str | None = None  # "module:function(out_dir)" that writes the folder


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
    )
}


def resolve(name: str) -> str:
    """Folder path or hub id for `name`; builds registry models that are made in code."""
    entry = REGISTRY.get(name)
    if entry is None:
        return name
    if entry.folder is not None:
        if not (entry.folder / "model_index.json").exists():
            raise FileNotFoundError(f"model {name!r}: weights missing at {entry.folder}")
        return str(entry.folder)
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
        getattr(importlib.import_module(module), func)(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
