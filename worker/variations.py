"""The RQ task for image variations (`worker.variations.vary`), queued by `POST /variations`.

Kandinsky 2.2 does what DALL·E 2 does: the unCLIP prior's CLIP image encoder turns the input into
an image embedding, and the decoder draws new images from that embedding and fresh noise per seed.
Families without an image-embedding path re-draw the input instead (img2img): an image-to-image
pipeline built on the loaded modules (`AutoPipelineForImage2Image.from_pipe`, no second copy)
noises it to `strength` and denoises it guided by the optional prompt. Progress, cancel, events and
PNG storage are `worker.tasks.run_job`, given a runtime that samples variations.
"""

from __future__ import annotations

import dataclasses
import io
import math
import secrets
import time
from typing import Any, cast

from PIL import Image, ImageOps
from pydantic import ValidationError
from rq import get_current_job

from app.core.images import InputImageError, normalize_image
from app.core.jobs import MAX_SEED, ErrorCode, GenerationParams
from app.core.variations import VariationParams, input_key
from worker import tasks
from worker.runtime import StepCallback, check_size, cpu_generators

_IMG2IMG: dict[int, Any] = {}  # id(text-to-image pipeline) -> its image-to-image twin


def vary(params: dict[str, Any]) -> dict[str, Any]:
    ctx = tasks._context
    if ctx is None:
        raise RuntimeError("worker.variations.vary runs only inside `python -m worker`")
    job = get_current_job()
    assert job is not None
    try:
        result = _vary(ctx, job, params, time.perf_counter())
    except tasks.JobFailedError:
        ctx.connection.delete(input_key(job.id))  # final (refused, invalid, failed, canceled): nothing runs it again
        raise
    ctx.connection.delete(input_key(job.id))
    return result


def _vary(ctx: tasks.WorkerContext, job: Any, params: dict[str, Any], prepared: float) -> dict[str, Any]:
    # 1. Validate again (the queue may hold jobs from other producers), then load the input image.
    try:
        request = VariationParams.model_validate(params)
    except ValidationError as exc:
        raise tasks._fail(job, ErrorCode.invalid_params, tasks._first_error(exc)) from None
    request = cast(VariationParams, ctx.runtime.info.fill(request))
    if request.seed is None:
        request = request.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    try:
        check_size(ctx.runtime.info, request)
    except ValueError as exc:
        raise tasks._fail(job, ErrorCode.invalid_params, str(exc)) from None
    pipe = getattr(ctx.runtime, "pipe", None)
    if pipe is None:
        raise tasks._fail(job, ErrorCode.invalid_params, "this worker's runtime cannot make variations")
    embeds = _is_unclip(pipe)
    raw = ctx.connection.get(input_key(job.id))
    if raw is None:
        raise tasks._fail(job, ErrorCode.invalid_params, "the input image is missing or has expired")
    try:
        # The API wrote it (a PNG of at most the largest size allowed, which can pass the upload limit
        # in bytes): its pixels and format are checked again, not its length.
        data = cast(bytes, raw)
        image = Image.open(io.BytesIO(normalize_image(data, max_bytes=len(data))))
        image.load()
    except InputImageError as exc:  # only the API writes the key, but never trust it
        raise tasks._fail(job, ErrorCode.invalid_params, exc.message) from None

    # 2-4. The shared job flow, sampling with this image.
    sampler = VariationSampler(ctx.runtime, image, embeds)
    return tasks.run_job(dataclasses.replace(ctx, runtime=sampler), job, request, prepared)


def _is_unclip(pipe: Any) -> bool:
    """A pipeline with an unCLIP prior that has a CLIP image encoder (Kandinsky 2.2 combined)."""
    prior = getattr(pipe, "prior_pipe", None)
    return prior is not None and getattr(prior, "image_encoder", None) is not None


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and crop the centre (no distortion)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


class VariationSampler:
    """Looks like the worker's runtime to `run_job`, but `generate` makes variations of one image."""

    def __init__(self, runtime: Any, image: Image.Image, embeds: bool) -> None:
        self.runtime = runtime
        self.info = runtime.info
        self.image = image
        self.embeds = embeds

    def count_tokens(self, prompt: str) -> int:
        return self.runtime.count_tokens(prompt) if prompt else 0

    def free_memory(self) -> None:
        self.runtime.free_memory()

    def generate(self, params: GenerationParams, on_step: StepCallback) -> list[Image.Image]:
        import torch

        request = cast(VariationParams, params)
        assert request.seed is not None and request.scheduler is not None
        assert request.width is not None and request.height is not None
        steps = request.num_inference_steps or self.info.num_inference_steps
        generators = cpu_generators(request.seed, request.num_images)  # on the CPU, any device
        scheduler = self.runtime.use_scheduler(request.scheduler)
        with torch.inference_mode():
            if self.embeds:
                return self._from_embedding(request, steps, generators, on_step)
            return self._img2img(request, steps, generators, scheduler, on_step)

    def _from_embedding(
        self, request: VariationParams, steps: int, generators: list[Any], on_step: StepCallback
    ) -> list[Image.Image]:
        pipe = self.runtime.pipe
        prior, decoder = pipe.prior_pipe, pipe.decoder_pipe
        encoder = prior.image_encoder
        # image -> CLIP image embedding (what the prior would have predicted from a caption) ...
        pixels = prior.image_processor(self.image, return_tensors="pt").pixel_values
        embeds = encoder(pixels.to(device=self.runtime.device, dtype=encoder.dtype)).image_embeds
        # ... and the embedding of a blank image as the unconditional side of guidance, as the prior does.
        # One row per image, repeated here: the decoder repeats them itself only with guidance on
        # (without, several images met one embedding and the job failed).
        n = request.num_images
        embeds = embeds.repeat_interleave(n, dim=0)
        negative = prior.get_zero_embed(n, device=self.runtime.device)

        def callback(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(min(step + 1, steps), steps)  # some samplers run a step more than asked (pndm)
            return tensors

        out = decoder(
            image_embeds=embeds,
            negative_image_embeds=negative,
            width=request.width,
            height=request.height,
            num_inference_steps=steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=1,
            generator=generators,
            callback_on_step_end=callback,
            output_type="pil",
        )
        return list(out.images)

    def _img2img(
        self, request: VariationParams, steps: int, generators: list[Any], scheduler: Any, on_step: StepCallback
    ) -> list[Image.Image]:
        pipe = _img2img_pipe(self.runtime.pipe)
        pipe.scheduler = scheduler
        assert request.width is not None and request.height is not None
        start = fit_image(self.image, request.width, request.height)
        # img2img runs int(steps * strength) steps; one-step models (turbo) would run none, so
        # stretch the schedule until at least one step falls at the requested noise level, never
        # past the training timesteps (a strength of 1e-9 asked for a 10^9-step schedule and
        # exhausted the machine's memory; the API refuses strengths under 0.001).
        limit = int(getattr(scheduler.config, "num_train_timesteps", 1000))
        schedule = min(limit, max(steps, math.ceil(1 / request.strength - 1e-9)))

        def callback(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # img2img runs only the last `strength` share of the steps; report against the requested
            # total so progress ends at steps/steps like any other job.
            ran = max(1, int(getattr(p, "num_timesteps", 0) or steps))
            on_step(min(steps, math.ceil((step + 1) * steps / ran)), steps)
            return tensors

        out = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            image=start,
            strength=request.strength,
            num_inference_steps=schedule,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=generators,
            callback_on_step_end=callback,
            output_type="pil",
        )
        return list(out.images)


def _img2img_pipe(pipe: Any) -> Any:
    """The image-to-image pipeline sharing `pipe`'s modules (built once, a few ms)."""
    twin = _IMG2IMG.get(id(pipe))
    if twin is None:
        from diffusers import AutoPipelineForImage2Image

        twin = AutoPipelineForImage2Image.from_pipe(pipe)
        twin.set_progress_bar_config(disable=True)
        _IMG2IMG[id(pipe)] = twin
    return twin
