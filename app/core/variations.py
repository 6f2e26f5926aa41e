"""The image-variations contract shared by the API and the worker: parameters, and the Redis key
where a job's input image (a PNG the API re-encoded) waits for the worker. Imports pydantic only.

The image never travels in the RQ job payload: the key is derived from the job id, so a job
planted on the queue cannot point the worker at any other key.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from app.core.jobs import GenerationParams, not_bool

INPUT_PREFIX = "imagegen:input:"


def input_key(job_id: str) -> str:
    """Redis string holding the PNG bytes a variations job starts from."""
    return f"{INPUT_PREFIX}{job_id}"


class VariationParams(GenerationParams):
    """Variations of an input image. On Kandinsky (unCLIP) the image's CLIP embedding conditions the
    decoder, as in DALL·E 2, and `prompt`/`strength` are not used; on Stable Diffusion families the
    image is noised to `strength` and denoised again guided by `prompt` (img2img)."""

    prompt: str = Field("", max_length=1000, description="Optional text guiding img2img variations.")
    strength: float = Field(
        0.75, ge=0.001, le=1, description="img2img only: how much of the input is re-drawn (0.001-1; 1 = all of it)."
    )

    _strength_not_bool = field_validator("strength", mode="before")(lambda v: not_bool(v))

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:  # overrides GenerationParams': a variation needs no prompt
        return v
