"""The model runtime: one small interface (`generate(params, on_step) -> images`) and its diffusers
implementation. Owns torch; the API never imports this module.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from app.core.jobs import GenerationParams, ModelInfo, Scheduler, image_seed

if TYPE_CHECKING:
    from PIL.Image import Image

    from app.core.config import Settings

log = logging.getLogger(__name__)

# Called after every denoising step with (step, total); raising from it stops sampling at once.
StepCallback = Callable[[int, int], None]

SCHEDULER_CLASSES: dict[Scheduler, tuple[str, dict[str, Any]]] = {
    Scheduler.ddim: ("DDIMScheduler", {}),
    Scheduler.euler: ("EulerDiscreteScheduler", {}),
    Scheduler.euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Scheduler.dpmpp_2m: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    Scheduler.unipc: ("UniPCMultistepScheduler", {}),
    Scheduler.pndm: ("PNDMScheduler", {}),
}
DEFAULTS_FILE = "imagegen.json"  # optional per-model defaults saved next to model_index.json


class Runtime(Protocol):
    info: ModelInfo

    def generate(self, params: GenerationParams, on_step: StepCallback) -> list[Image]:
        """Images for fully filled-in params (seed set); image i uses `image_seed(seed, i)`."""
        ...

    def count_tokens(self, prompt: str) -> int: ...


class DiffusersRuntime:
    """A diffusers text-to-image pipeline kept resident for the life of the process.

    One job at a time: a pipeline object is not safe to share between threads.
    """

    def __init__(self, pipe: Any, info: ModelInfo, device: str) -> None:
        self.pipe = pipe
        self.info = info
        self.device = device
        self._schedulers: dict[Scheduler, Any] = {}
        self._base_scheduler_config = pipe.scheduler.config

    @classmethod
    def load(cls, settings: Settings) -> DiffusersRuntime:
        import torch
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        from models.registry import resolve

        started = time.perf_counter()
        source = resolve(settings.model)
        dtype = getattr(torch, settings.dtype)
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
        except ValueError:  # a pipeline class AutoPipeline does not map
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype)
        pipe = pipe.to(settings.device)
        pipe.set_progress_bar_config(disable=True)
        info = _model_info(settings.model, source, pipe)
        log.info("loaded %s from %s in %.2fs", settings.model, source, time.perf_counter() - started)
        return cls(pipe, info, settings.device)

    def warm_up(self) -> None:
        """One tiny run so the first real job does not pay for lazy initialisation."""
        params = self.info.fill(GenerationParams(prompt="warm up", num_inference_steps=1, seed=0))
        self.generate(params, lambda step, total: None)

    def count_tokens(self, prompt: str) -> int:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt, truncation=False).input_ids)

    def _scheduler(self, name: Scheduler) -> Any:
        if name not in self._schedulers:
            import diffusers

            cls_name, extra = SCHEDULER_CLASSES[name]
            cls = getattr(diffusers, cls_name)
            self._schedulers[name] = cls.from_config(self._base_scheduler_config, **extra)
        return self._schedulers[name]

    def generate(self, params: GenerationParams, on_step: StepCallback) -> list[Image]:
        import torch

        assert params.seed is not None and params.scheduler is not None
        steps = params.num_inference_steps or self.info.num_inference_steps
        # 1. Per-image generators: image i is reproducible alone from seed + i.
        generators = [
            torch.Generator(self.device).manual_seed(image_seed(params.seed, i)) for i in range(params.num_images)
        ]
        # 2. This request's sampler (one job at a time, so swapping it on the pipeline is safe).
        self.pipe.scheduler = self._scheduler(params.scheduler)

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, steps)
            return tensors

        # 3. CLIP text encoding, guided denoising over the UNet and VAE decode, in the pipeline.
        with torch.inference_mode():
            out = self.pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                num_images_per_prompt=params.num_images,
                width=params.width,
                height=params.height,
                num_inference_steps=steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
                callback_on_step_end=callback,
                output_type="pil",
            )
        return list(out.images)


def _model_info(name: str, source: str, pipe: Any) -> ModelInfo:
    """Defaults for requests: `imagegen.json` in the folder if present, else read off the pipeline."""
    defaults: dict[str, Any] = {}
    path = Path(source) / DEFAULTS_FILE
    if path.is_file():
        defaults = json.loads(path.read_text())
    unet = getattr(pipe, "unet", None)
    native = 512
    if unet is not None and isinstance(unet.config.sample_size, int):
        native = unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
    by_class = {cls_name: enum for enum, (cls_name, _) in SCHEDULER_CLASSES.items()}
    scheduler = by_class.get(type(pipe.scheduler).__name__, Scheduler.euler)
    tokenizer = getattr(pipe, "tokenizer", None)
    return ModelInfo(
        name=name,
        family=defaults.get("family", "stable-diffusion"),
        width=defaults.get("width", native),
        height=defaults.get("height", native),
        num_inference_steps=defaults.get("num_inference_steps", 25),
        guidance_scale=defaults.get("guidance_scale", 7.5),
        scheduler=Scheduler(defaults.get("scheduler", scheduler.value)),
        max_tokens=getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77,
    )
