"""The model runtime: one small interface (`generate(params, on_step) -> images`) and its diffusers
implementation. Owns torch; the API never imports this module.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.jobs import GenerationParams, ModelInfo, Scheduler, image_seed

if TYPE_CHECKING:
    from PIL.Image import Image

    from app.core.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Called after every denoising step with (step, total); raising from it stops sampling at once.
StepCallback = Callable[[int, int], None]

SCHEDULER_CLASSES: dict[Scheduler, tuple[str, dict[str, Any]]] = {
    Scheduler.ddim: ("DDIMScheduler", {}),
    Scheduler.euler: ("EulerDiscreteScheduler", {}),
    Scheduler.euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Scheduler.dpmpp_2m: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    Scheduler.unipc: ("UniPCMultistepScheduler", {}),
    # PLMS alone, as Stable Diffusion runs it: the Runge-Kutta warm-up needs at least 4 steps.
    Scheduler.pndm: ("PNDMScheduler", {"skip_prk_steps": True}),
}
DEFAULTS_FILE = "imagegen.json"  # optional per-model defaults saved next to model_index.json
# Requests may ask for up to this many times a model's native width and height (and never more
# than the API's IMAGEGEN_MAX_WIDTH/_HEIGHT); `max_width`/`max_height` in imagegen.json override it.
MAX_SIZE_FACTOR = 8
COMPILE_BACKEND = "inductor"  # torch.compile's own default, named so that tests can swap it


def cpu_generators(seed: int, count: int) -> list[Any]:
    """Per-image generators for a job: image i draws from `image_seed(seed, i)`, on the CPU whatever
    the device. diffusers' `randn_tensor` draws with a CPU generator on the CPU and moves the noise to
    the device, so a seed starts from the same noise on a CPU and a CUDA worker (a CUDA generator
    draws other numbers for the same seed); the images still differ slightly between devices and
    precisions. On the CPU nothing changes."""
    import torch

    return [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(count)]


class Runtime(Protocol):
    info: ModelInfo

    def generate(self, params: GenerationParams, on_step: StepCallback) -> list[Image]:
        """Images for fully filled-in params (seed set); image i uses `image_seed(seed, i)`."""
        ...

    def count_tokens(self, prompt: str) -> int: ...

    def free_memory(self) -> None:
        """Release cached memory after an out-of-memory error."""
        ...


class DiffusersRuntime:
    """A diffusers text-to-image pipeline kept resident for the life of the process.

    One job at a time: a pipeline object is not safe to share between threads.
    """

    def __init__(self, pipe: Any, info: ModelInfo, device: str, options: dict[str, Any] | None = None) -> None:
        self.pipe = pipe
        self.info = info
        self.device = device
        self.options = options or {}  # family settings beyond ModelInfo (the unCLIP prior's steps, guidance)
        self._schedulers: dict[Scheduler, Any] = {Scheduler.native: pipe.scheduler}
        self._base_scheduler_config = pipe.scheduler.config

    @classmethod
    def load(cls, settings: Settings) -> DiffusersRuntime:
        import torch
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        from models.registry import lookup, resolve

        started = time.perf_counter()
        source = resolve(settings.model)
        entry = lookup(settings.model)
        dtype_name: str = settings.dtype
        # A registry entry's half precision applies on CUDA unless IMAGEGEN_DTYPE was set explicitly.
        if entry is not None and entry.dtype and settings.device == "cuda" and "dtype" not in settings.model_fields_set:
            dtype_name = entry.dtype
        dtype = getattr(torch, dtype_name)
        extra: dict[str, Any] = {}
        if entry is not None and entry.variant and dtype_name == entry.dtype:
            extra["variant"] = entry.variant  # fetch the half-size weight files, not the float32 ones
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, **extra)
        except ValueError:  # a pipeline class AutoPipeline does not map
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **extra)
        pipe = pipe.to(settings.device)
        pipe.set_progress_bar_config(disable=True)
        _optimize(pipe, settings)
        if getattr(pipe, "prior_pipe", None) is not None:
            # Kandinsky's combined pipeline hands the deprecated `callback_steps` to its decoder by
            # itself, which would log a FutureWarning on every job.
            warnings.filterwarnings("ignore", message=".*callback_steps.*", category=FutureWarning)
        defaults = _read_defaults(source) | (entry.defaults() if entry is not None else {})
        info = _model_info(settings.model, pipe, defaults)
        log.info("loaded %s (%s) from %s in %.2fs", settings.model, info.family, source, time.perf_counter() - started)
        return cls(pipe, info, settings.device, defaults)

    def warm_up(self) -> None:
        """One tiny run so the first real job does not pay for lazy initialisation (nor compilation,
        with `IMAGEGEN_COMPILE`: see `eager_if_compiling_fails`)."""
        params = self.info.fill(GenerationParams(prompt="warm up", num_inference_steps=1, seed=0))
        self.eager_if_compiling_fails(lambda: self.generate(params, lambda step, total: None))

    @property
    def compiled(self) -> bool:
        """Whether the UNet runs through `torch.compile` (`IMAGEGEN_COMPILE`, and it compiled)."""
        return getattr(getattr(self.pipe, "unet", None), "_compiled_call_impl", None) is not None

    def uncompile(self) -> None:
        """Back to the eager UNet: `Module.compile` only set `_compiled_call_impl`, which every call
        takes when it is set; dynamo's caches (what was compiled so far) are dropped."""
        import torch

        self.pipe.unet._compiled_call_impl = None
        torch._dynamo.reset()

    def eager_if_compiling_fails(self, run: Callable[[], T]) -> T:
        """`run()` (a warm-up: compilation happens at the compiled UNet's first calls); where it
        fails while the UNet is compiled, warn, fall back to the eager UNet and run it again.

        Compiling needs a working C compiler (inductor's C++ kernels on the CPU, Triton's launcher on
        CUDA), which a slim image may not have: that stopped the worker at every start. An error
        that the eager UNet gives as well (a size the model refuses) is raised from the second run.
        """
        if not self.compiled:
            return run()
        try:
            return run()
        except Exception as exc:
            cause = compile_failure(exc)
            log.debug("compiled warm-up failed", exc_info=True)
        self.uncompile()
        result = run()
        log.warning("IMAGEGEN_COMPILE: compiling the UNet failed (%s); it runs uncompiled", cause)
        return result

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def count_tokens(self, prompt: str) -> int:
        tokenizer = _tokenizer(self.pipe)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt, truncation=False).input_ids)

    def _scheduler(self, name: Scheduler) -> Any:
        if name not in self._schedulers:
            import diffusers

            cls_name, extra = SCHEDULER_CLASSES[name]
            cls = getattr(diffusers, cls_name)
            base = self._base_scheduler_config
            if name is Scheduler.ddim and "clip_sample" not in base:
                # A model saved with another sampler (tiny-shapes: DPM++) says nothing of it, and
                # DDIM's own default clips every x0 estimate to [-1, 1], which turned tiny-shapes'
                # colours wrong (fg right in 4 % of prompts, against 98 % with the others).
                extra = {**extra, "clip_sample": False}
            self._schedulers[name] = cls.from_config(base, **extra)
        return self._schedulers[name]

    def generate(self, params: GenerationParams, on_step: StepCallback) -> list[Image]:
        import torch

        assert params.seed is not None and params.scheduler is not None
        check_size(self.info, params)
        steps = params.num_inference_steps or self.info.num_inference_steps
        # 1. Per-image generators: image i is reproducible alone from seed + i (on the CPU, any device).
        generators = cpu_generators(params.seed, params.num_images)
        # 2. This request's sampler (one job at a time, so swapping it on the pipeline is safe).
        self.use_scheduler(params.scheduler)

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(min(step + 1, steps), steps)  # some samplers run a step more than asked (pndm)
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
                **self._family_kwargs(on_step, steps),
            )
        return list(out.images)

    def use_scheduler(self, name: Scheduler) -> Any:
        """Put this request's sampler on the pipeline (and on a combined pipeline's decoder, which
        keeps its own reference) and return it."""
        scheduler = self._scheduler(name)
        self.pipe.scheduler = scheduler
        decoder = getattr(self.pipe, "decoder_pipe", None)
        if decoder is not None:
            decoder.scheduler = _taking_generator(scheduler)
        return scheduler

    def _family_kwargs(self, on_step: StepCallback, steps: int) -> dict[str, Any]:
        """Arguments only some families take: Kandinsky's combined pipeline runs the unCLIP prior first."""
        if getattr(self.pipe, "prior_pipe", None) is None:
            return {}

        def prior_callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(0, steps)  # no decoder step yet; lets a cancel stop the prior too
            return tensors

        return {
            "prior_num_inference_steps": int(self.options.get("prior_num_inference_steps", 25)),
            "prior_guidance_scale": float(self.options.get("prior_guidance_scale", 4.0)),
            "prior_callback_on_step_end": prior_callback,
        }


def compile_failure(exc: BaseException) -> str:
    """What made a compiled call fail, in one line: the innermost error that dynamo's and inductor's
    wrappers (`BackendCompilerFailed`, `InductorError`) carry, e.g. `InvalidCxxCompiler: No working
    C++ compiler found ...`."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _taking_generator(scheduler: Any) -> Any:
    """The scheduler, made to accept (and ignore) `generator` in `step` when it has no use for it:
    Kandinsky's decoder passes one to every sampler, and PNDM's and UniPC's `step` refuse it."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return scheduler
    step = type(scheduler).step

    def step_without_generator(*args: Any, generator: Any = None, **kwargs: Any) -> Any:
        return step(scheduler, *args, **kwargs)

    scheduler.step = step_without_generator  # this instance only: the runtime keeps one per sampler
    return scheduler


def check_size(info: ModelInfo, params: GenerationParams) -> None:
    """Refuse sizes the model would silently round (Kandinsky rounds up to its MoVQ multiple) or
    that are beyond its `max_width`/`max_height`."""
    problem = info.size_problem(params)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")


class ModelDefaults(BaseModel):
    """What an `imagegen.json` may say (the registry entries' keys, plus the size bounds)."""

    model_config = ConfigDict(extra="forbid")

    # The bounds requests have (a default beyond them would be every request's, unchecked); the
    # model's own size multiple (Kandinsky's 64) is checked by the warm-up.
    family: str | None = None
    width: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30, allow_inf_nan=False)
    scheduler: Scheduler | None = None
    prior_num_inference_steps: int | None = Field(None, ge=1, le=150)
    prior_guidance_scale: float | None = Field(None, ge=0, le=30, allow_inf_nan=False)
    max_width: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    max_height: int | None = Field(None, ge=8, le=8192, multiple_of=8)


def _read_defaults(source: str) -> dict[str, Any]:
    """`imagegen.json` next to model_index.json, if the model is a folder that has one; a file that
    is not such an object (a misspelt key, a size given as text) stops the worker, naming it."""
    path = Path(source) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        return ModelDefaults.model_validate_json(path.read_bytes()).model_dump(exclude_none=True, mode="json")
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the file"
        raise ValueError(f"{path}: {where}: {err['msg']}") from None


def _tokenizer(pipe: Any) -> Any:
    # Kandinsky's combined pipeline reads the prompt with its prior's tokenizer.
    return getattr(pipe, "tokenizer", None) or getattr(pipe, "prior_tokenizer", None)


def _family(pipe: Any) -> str:
    """The family of a pipeline not described by the registry or an imagegen.json."""
    name = type(pipe).__name__
    if "Kandinsky" in name:
        return "kandinsky-2.2"
    if "XL" in name:
        return "sdxl"
    return "stable-diffusion"


def _model_info(name: str, pipe: Any, defaults: dict[str, Any]) -> ModelInfo:
    """Defaults for requests: the registry entry and `imagegen.json` first, else read off the pipeline."""
    unet = getattr(pipe, "unet", None)
    decoder = getattr(pipe, "decoder_pipe", None)
    # Pixels per latent: the VAE's factor, or the MoVQ's on Kandinsky.
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(decoder, "movq_scale_factor", None) or 8
    native = 512
    if unet is not None and isinstance(unet.config.sample_size, int):
        native = unet.config.sample_size * scale
    # Kandinsky rounds sizes up to multiples of the MoVQ factor squared (64 on real checkpoints).
    multiple = max(8, scale * scale) if decoder is not None else 8
    # The model's own sampler by its name where it is one of ours; else kept as it is (`native`):
    # replaced by Euler, an LCM-distilled model drew noise at its few steps.
    by_class = {cls_name: enum for enum, (cls_name, _) in SCHEDULER_CLASSES.items()}
    scheduler = by_class.get(type(pipe.scheduler).__name__, Scheduler.native)
    tokenizer = _tokenizer(pipe)
    width, height = defaults.get("width", native), defaults.get("height", native)
    return ModelInfo(
        name=name,
        family=defaults.get("family") or _family(pipe),
        width=width,
        height=height,
        num_inference_steps=defaults.get("num_inference_steps", 25),
        guidance_scale=defaults.get("guidance_scale", 7.5),
        scheduler=Scheduler(defaults.get("scheduler", scheduler.value)),
        max_tokens=getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77,
        size_multiple=multiple,
        max_width=defaults.get("max_width", MAX_SIZE_FACTOR * width),
        max_height=defaults.get("max_height", MAX_SIZE_FACTOR * height),
    )


def _optimize(pipe: Any, settings: Settings) -> None:
    """Direct attention calls (always), then the GPU deployment switches: channels-last layout and
    `torch.compile` of the denoiser.

    Attention already goes through PyTorch's SDPA (diffusers' default processor). Compilation
    happens at the first call (the warm-up). Dynamo compiles again at the second batch size it sees
    (the batch dimension then becomes dynamic, which covers every later size but one: a single
    row is specialised apart); so a batching worker warms up at 1, 2 and more rows
    (`BatchEngine.warm_up`), else its first batches would each wait for a compilation (tens of
    seconds for SD 1.5 on a GPU). The first jobs at a second image size still compile again (the
    batched graph and the lone row's), after which height and width are dynamic too. Where
    compiling fails the runtime falls back to the eager UNet (`eager_if_compiling_fails`).
    """
    import torch

    direct_attention(pipe)
    denoiser = getattr(pipe, "unet", None)
    if settings.channels_last:
        for module in (denoiser, getattr(pipe, "vae", None)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if settings.compile and denoiser is not None:
        denoiser.compile(backend=COMPILE_BACKEND)  # in place: the module keeps its class (batching recognises it)


def direct_attention(pipe: Any) -> int:
    """Let the pipeline's attention modules call their processor without inspecting it each time.

    diffusers' `Attention.forward` reads its processor's signature with `inspect` on every call, to
    drop (and warn about) keyword arguments the processor does not take. The pipelines here pass
    none, so that finds nothing, yet it costs tens of µs per call: 4–8 % of a tiny UNet's step on
    this CPU, and on a GPU the launch-bound host time of every attention layer. Modules whose class
    has its own `forward` are left alone; a call with extra arguments still takes diffusers' path.
    Returns how many modules were switched.
    """
    import torch
    from diffusers.models.attention_processor import Attention

    stock = Attention.forward

    def forward(
        self: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None, **extra: Any
    ) -> Any:
        if extra:
            return stock(self, hidden_states, encoder_hidden_states, attention_mask, **extra)
        return self.processor(
            self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask
        )

    switched = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, Attention) and type(module).forward is stock and "forward" not in vars(module):
                module.forward = MethodType(forward, module)  # type: ignore[method-assign]
                switched += 1
    return switched
