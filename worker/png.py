"""PNG encoding with the generation parameters in text chunks (so a file explains itself)."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:
    from PIL.Image import Image

    from app.core.jobs import GenerationParams


def encode_png(image: Image, params: GenerationParams, seed: int) -> bytes:
    info = PngInfo()
    info.add_itxt("prompt", params.prompt)
    if params.negative_prompt:
        info.add_itxt("negative_prompt", params.negative_prompt)
    info.add_text("seed", str(seed))
    info.add_itxt("parameters", json.dumps(params.model_dump(mode="json") | {"seed": seed}, sort_keys=True))
    info.add_text("Software", "imagegen")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
