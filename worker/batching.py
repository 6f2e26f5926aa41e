"""Step-level batched sampling for Stable-Diffusion-style pipelines.

Every request keeps its own scheduler, step index, latents, text embeddings and generators; one
`tick` runs a single UNet forward over the current step of every active request (each row with
its own timestep), then steps each request's scheduler on its own slice. Requests can therefore
join and leave between any two ticks. Text is encoded per prompt; the images of requests that
finish on the same tick are VAE-decoded together (see `decode_many`).

Batch invariance on CPU: the small timestep-embedding layers pick batch-size-dependent kernels,
so `BatchEngine.create` runs the timestep embedding and every ResNet block's time projection one
row at a time. oneDNN's convolutions take another kernel for a single row than for two or more
(measured: each row's bits are the same in every batch of 2 to 40 rows, at any position, but differ
from the row alone), so the engine never runs the UNet on one row: a lone row is doubled. Whether
that holds on the machine at hand is checked when the engine is created (`_rows_agree`); where it
does not, oneDNN is turned off for the process and the native per-sample convolutions (slower on
few channels) are used. NNPACK, which takes over from batch 16 up, is always off. With these, a
request gives the same bits alone or in any batch.

Invariance is kept on the CPU only (`create` refuses it on another device): on a GPU, cuBLAS and
cuDNN pick kernels by batch size, which none of these switches reach, and the per-row layers would
cost a device-to-host copy each per UNet call (their cache keys) for nothing.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.core.jobs import GenerationParams, Scheduler

if TYPE_CHECKING:
    from PIL.Image import Image

    from worker.runtime import DiffusersRuntime

log = logging.getLogger(__name__)
EMBEDDING_CACHE = 64  # text embeddings kept (the empty negative prompt is the one nearly every job shares)
ROW_CACHE = 256  # results kept per cached per-row layer (see `make_batch_invariant`)


@dataclass
class Request:
    """One job's sampling state between ticks."""

    params: GenerationParams
    scheduler: Any
    timesteps: Any  # 1-D tensor of this request's timesteps
    latents: Any  # [num_images, C, h, w]
    embeds: Any  # [2n, L, D] (negative rows first, as the pipeline does) or [n, L, D] without CFG
    guidance: float
    cfg: bool
    generators: list[Any]
    step_kwargs: dict[str, Any]
    step: int = 0  # index of the next timestep to run
    work_s: float = 0.0  # this request's share of the batched ticks it took part in (seconds)
    # UNet rows per call while this request takes part in a tick: set to one image's rows once it
    # ran out of memory alone (the one-job path's split, image by image); None: one call for all.
    chunk_rows: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def rows(self) -> int:
        """Rows this request adds to the UNet batch."""
        return self.latents.shape[0] * self.image_rows

    @property
    def image_rows(self) -> int:
        """UNet rows per image: two with guidance (negative and positive)."""
        return 2 if self.cfg else 1


def _rowwise(module: Any, vectors_only: bool = False) -> Any:
    """Wrap a module fed one vector per sample so it runs one row at a time.

    A [B, C] linear goes through a matrix-vector kernel at B = 1 and a matrix-matrix kernel above,
    whose sums round differently; an activation over B * C elements takes its vectorised or its
    scalar path depending on the total length. One row at a time always takes the same path.
    With `vectors_only`, inputs of any other rank (feature maps) go through unchanged. The module
    must be a pure function of its input: the last `ROW_CACHE` results are kept by the row's bytes
    (each computed alone, so reusing one changes no bit); calls with extra inputs are not cached.
    `torch.compile` does not trace it (its byte keys made dynamo break the graph and recompile at
    every new row until it gave up): a compiled UNet calls it as plain Python.
    """
    import torch

    class Rowwise(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.results: OrderedDict[bytes, Any] = OrderedDict()

        @torch.compiler.disable  # type: ignore[misc]
        def forward(self, sample: Any, *args: Any) -> Any:
            if vectors_only and sample.dim() != 2:
                return self.inner(sample, *args)
            n = sample.shape[0]
            if any(a is not None for a in args):
                rows = [self.inner(sample[i : i + 1], *(a[i : i + 1] if a is not None else None for a in args))
                        for i in range(n)]  # fmt: skip
                return torch.cat(rows)
            # Keyed by each row's bytes (one copy of the whole batch to host memory, then slices),
            # read as uint8: numpy has no bfloat16.
            data = sample.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
            width, suffix = len(data) // n, str((1, *sample.shape[1:], sample.dtype)).encode()
            rows = []
            for i in range(n):
                key = data[i * width : (i + 1) * width] + suffix
                hit = self.results.get(key)
                if hit is None:
                    hit = self.results[key] = self.inner(sample[i : i + 1])
                    if len(self.results) > ROW_CACHE:
                        self.results.popitem(last=False)
                else:
                    self.results.move_to_end(key)
                rows.append(hit)
            return torch.cat(rows)

    return Rowwise(module)


def make_batch_invariant(unet: Any) -> int:
    """Run the UNet's per-sample vector layers row by row; returns how many were wrapped."""
    import torch

    if type(unet.time_embedding).__name__ == "Rowwise":
        return 0
    # Every wrapped layer is a pure function of its row, and rows repeat (both rows of a guided
    # request, every request at the same timestep), so results are kept by the row's bytes.
    unet.time_embedding = _rowwise(unet.time_embedding)
    wrapped = 1
    # A text-pooled embedding added to the time embedding (addition_embed_type "text") is per sample
    # too. It depends on the prompt alone, so each request's rows are computed once, not every step.
    if getattr(unet, "add_embedding", None) is not None:
        unet.add_embedding = _rowwise(unet.add_embedding)
        wrapped += 1
    # Every ResNet block activates the time embedding and projects it with its own small linear.
    # An activation over rows of a multiple of 64 values never reaches the scalar tail loop that
    # handles what is left over after the widest vectors, so only other widths go row by row (the
    # activation module also serves the feature maps, which pass through untouched).
    for module in list(unet.modules()):
        proj = getattr(module, "time_emb_proj", None)
        if isinstance(proj, torch.nn.Linear):
            module.time_emb_proj = _rowwise(proj)
            wrapped += 1
            if proj.in_features % 64:
                module.nonlinearity = _rowwise(module.nonlinearity, vectors_only=True)
                wrapped += 1
    return wrapped


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block's CPU ops on the calling thread alone.

    One prompt through the text encoder is dozens of tiny ops. Split across torch's threads, each
    waits for a helper thread that, in a busy worker, is asleep or sharing its core with the API and
    Redis: on tiny-random under 16 clients a prompt took ~5.6 ms that way (0.7 ms when idle). On
    one thread it never waits. Both tiny models give the same bits either way; where a model's
    kernels round differently on one thread, batch invariance still holds, since the engine encodes
    every prompt like this (only equality with the `IMAGEGEN_MAX_BATCH=1` path could change).
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchEngine:
    """Batched denoising over a loaded `DiffusersRuntime` pipeline (StableDiffusionPipeline family)."""

    def __init__(self, runtime: DiffusersRuntime) -> None:
        import torch

        self.runtime = runtime
        self.pipe = runtime.pipe
        self.device = torch.device(runtime.device)
        self.dtype = self.pipe.unet.dtype
        self._templates: dict[Scheduler, Any] = {}
        self._embeddings: OrderedDict[str, Any] = OrderedDict()
        self.invariant = False  # set by `create`: a lone UNet row is then doubled (see the module doc)
        self.batched_decode = True  # images finishing together share one VAE call (see `create`)
        self.lone_decode = False  # with invariance: a single image decodes as itself, not padded to two

    @staticmethod
    def supports(pipe: Any) -> str | None:
        """Why this pipeline cannot be batched here, or None when it can."""
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        if not isinstance(pipe, StableDiffusionPipeline):
            return f"{type(pipe).__name__} is not a StableDiffusionPipeline"
        unet: Any = getattr(pipe, "unet", None)
        if not isinstance(unet, UNet2DConditionModel):
            return "the denoiser is not a UNet2DConditionModel"
        config: Any = getattr(unet, "config", None)
        if config.time_cond_proj_dim is not None or config.addition_embed_type not in (None, "text"):
            return "UNets with extra conditioning (LCM, SDXL-style added embeddings) are not batched"
        if config.class_embed_type is not None:
            return "class-conditioned UNets are not batched"
        return None

    @classmethod
    def create(cls, runtime: DiffusersRuntime, invariant: bool = True, max_rows: int = 32) -> BatchEngine | None:
        """The engine for this runtime, or None (with a log line) when the pipeline is unsupported.

        `max_rows` is the largest UNet batch the caller will run (twice the images, with guidance);
        the invariance check covers batches up to it.
        """
        reason = cls.supports(runtime.pipe)
        if reason is not None:
            log.warning("batching disabled: %s; jobs run one at a time", reason)
            return None
        engine = cls(runtime)
        if invariant and runtime.device != "cpu":
            log.warning("batch invariance is kept on the CPU only; batches on %s run without it", runtime.device)
            invariant = False
        if invariant:
            import torch

            torch.backends.nnpack.set_flags(False)
            make_batch_invariant(runtime.pipe.unet)
            engine.invariant = True
            if runtime.device == "cpu" and torch.backends.mkldnn.enabled:
                started = time.perf_counter()
                if _rows_agree(engine, max_rows):
                    log.info("batch invariance checked with oneDNN on (%.2fs)", time.perf_counter() - started)
                else:
                    # Native convolutions compute each sample on its own, whatever the batch.
                    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
                    if _rows_agree(engine, max_rows):
                        log.info("oneDNN convolutions depend on the batch here; using native ones")
                    else:
                        log.warning("batched rows differ from the same rows alone; images may depend on the batch")
            # The VAE decodes one image at a time unless its rows agree in every even-sized batch.
            images = max(max_rows // 2, 2)
            engine.batched_decode = _decoded_rows_agree(engine, images)
            engine.lone_decode = engine.batched_decode and _decoded_rows_agree(engine, images, lone=True)
        return engine

    # -- requests -----------------------------------------------------------------------------

    def shape(self, params: GenerationParams) -> tuple[int | None, int | None]:
        """Requests of one shape share UNet batches (scheduler, steps and guidance may differ)."""
        return params.width, params.height

    def _new_scheduler(self, name: Scheduler) -> Any:
        # A pristine template per sampler, copied per request: every request owns its step state.
        if name not in self._templates:
            self._templates[name] = copy.deepcopy(self.runtime._scheduler(name))
        return copy.deepcopy(self._templates[name])

    def _embed(self, text: str) -> Any:
        """One text's CLIP embedding [1, L, D], as the pipeline computes it alone; recent ones are kept.

        The pipeline encodes the empty negative prompt of every guided request again; here it (and
        any repeated prompt) costs one dictionary lookup.
        """
        if text in self._embeddings:
            self._embeddings.move_to_end(text)
            return self._embeddings[text]
        with one_thread():
            embedding, _ = self.pipe.encode_prompt(text, self.device, 1, False)
        self._embeddings[text] = embedding
        if len(self._embeddings) > EMBEDDING_CACHE:
            self._embeddings.popitem(last=False)
        return embedding

    def start(self, params: GenerationParams) -> Request:
        """Encode the prompt, draw the initial noise and set up this request's scheduler.

        `params` must be filled in (seed, size, steps, guidance, scheduler), as for the runtime.
        """
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from worker.runtime import cpu_generators

        assert params.seed is not None and params.scheduler is not None and params.guidance_scale is not None
        assert params.width is not None and params.height is not None
        pipe = self.pipe
        n = params.num_images
        steps = params.num_inference_steps or self.runtime.info.num_inference_steps
        guidance = float(params.guidance_scale)
        cfg = guidance > 1
        with torch.inference_mode():
            # 1. Text: the pipeline's own encoder call, one text at a time, so it never depends on the
            #    batch; repeated per image and negative rows first, as the pipeline lays them out.
            positive = self._embed(params.prompt).repeat(n, 1, 1)
            if cfg:
                negative = self._embed(params.negative_prompt or "").repeat(n, 1, 1)
                embeds = torch.cat([negative, positive])
            else:
                embeds = positive
            # 2. This request's sampler and timesteps.
            scheduler = self._new_scheduler(params.scheduler)
            scheduler.set_timesteps(steps, device=self.device)
            # 3. Noise: one generator per image (image i is seed + i, drawn on the CPU whatever the
            #    device: see `cpu_generators`), scaled for this sampler.
            generators = cpu_generators(params.seed, n)
            shape = (n, pipe.unet.config.in_channels, params.height // pipe.vae_scale_factor,
                     params.width // pipe.vae_scale_factor)  # fmt: skip
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=embeds.dtype)
            latents = latents * scheduler.init_noise_sigma
        accepted = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0
        if "generator" in accepted:
            step_kwargs["generator"] = generators
        return Request(params, scheduler, scheduler.timesteps, latents, embeds, guidance, cfg, generators, step_kwargs)

    # -- one tick -----------------------------------------------------------------------------

    def tick(self, requests: Sequence[Request]) -> None:
        """Advance every request by one step with a single batched UNet forward."""
        import torch

        live = [r for r in requests if not r.done]
        if not live:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            inputs, embeds, times = [], [], []
            for r in live:
                t = r.timesteps[r.step]
                # 1. The pipeline's expansion for guidance, then this sampler's input scaling.
                x = torch.cat([r.latents] * 2) if r.cfg else r.latents
                x = r.scheduler.scale_model_input(x, t)
                inputs.append(x)
                embeds.append(r.embeds)
                # 2. One timestep per row (float32 holds every integer timestep exactly).
                times.append(t.to(torch.float32).expand(x.shape[0]))
            # 3. One UNet forward for every row of every request (in chunks while a request that
            #    ran out of memory takes part: rows are computed independently, so the same values).
            x, t, e = torch.cat(inputs), torch.cat(times), torch.cat(embeds)
            chunk = min((r.chunk_rows for r in live if r.chunk_rows), default=x.shape[0])
            if chunk >= x.shape[0]:
                out = self._unet(x, t, e)
            else:
                parts = range(0, x.shape[0], chunk)
                out = torch.cat([self._unet(x[i : i + chunk], t[i : i + chunk], e[i : i + chunk]) for i in parts])
            # 4. Guidance and the scheduler step on each request's own slice.
            offset = 0
            for r in live:
                noise = out[offset : offset + r.rows]
                offset += r.rows
                if r.cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + r.guidance * (text - uncond)
                t = r.timesteps[r.step]
                r.latents = r.scheduler.step(noise, t, r.latents, **r.step_kwargs, return_dict=False)[0]
                r.step += 1
        # 5. Each request is charged its share of the tick, for per-image step-time estimates.
        elapsed = time.perf_counter() - started
        rows = sum(r.rows for r in live)
        for r in live:
            r.work_s += elapsed * r.rows / rows

    def _unet(self, x: Any, t: Any, embeds: Any) -> Any:
        """The UNet's prediction for every row; a lone row runs as two copies when invariant."""
        import torch

        if self.invariant and x.shape[0] == 1:
            return self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([embeds, embeds]))[:1]
        return self.pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def decode(self, request: Request) -> list[Image]:
        """This request's images, VAE-decoded and converted to PIL as the pipeline does."""
        return self.decode_many([request])[0]

    def decode_many(self, requests: Sequence[Request]) -> list[list[Image]]:
        """The images of several requests (those finishing on the same step), decoded together when
        the VAE's rows allow it (`batched_decode`), else one image at a time; through the
        pipeline's safety checker where it has one (sd-1.5 from the hub), as its own call would."""
        import torch

        pipe = self.pipe
        latents = torch.cat([r.latents for r in requests]) / pipe.vae.config.scaling_factor
        with torch.inference_mode():
            if self.batched_decode:
                pixels = self._vae(latents)
            else:
                pixels = torch.cat([self._vae(latents[i : i + 1]) for i in range(latents.shape[0])])
            flags = None
            if getattr(pipe, "safety_checker", None) is not None:  # as the pipeline's own call does
                pixels, flags = pipe.run_safety_checker(pixels, pixels.device, pixels.dtype)
            # A flagged image comes back zeroed and is left so: black, as the pipeline returns it.
            keep = [True] * len(pixels) if flags is None else [not flagged for flagged in flags]
            images = pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=keep)
        out, start = [], 0
        for r in requests:
            out.append(images[start : start + r.latents.shape[0]])
            start += r.latents.shape[0]
        return out

    def _vae(self, latents: Any) -> Any:
        """Decoded pixels; when invariant and batched, an odd number of rows gets a copy of the last
        (a single row too, unless `lone_decode`)."""
        import torch

        rows = latents.shape[0]
        if self.invariant and self.batched_decode and rows % 2 and not (rows == 1 and self.lone_decode):
            return self._vae(torch.cat([latents, latents[-1:]]))[:-1]
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    def generate(self, params: GenerationParams) -> list[Image]:
        """One request alone, start to finish (warm-up and reference runs)."""
        request = self.start(params)
        while not request.done:
            self.tick([request])
        return self.decode(request)

    def warm_up(self) -> None:
        """One tiny request, so the first job pays for no lazy initialisation. With a compiled UNet
        also the batches that make dynamo compile again (see `runtime._optimize`): two requests
        together (the batch dimension turns dynamic: every size from 2 rows on) and a lone
        guidance-free request (1 row, specialised apart; never run with invariance, which doubles
        it). Where compiling fails, the UNet falls back to eager (`eager_if_compiling_fails`)."""
        self.runtime.eager_if_compiling_fails(self._warm_up)

    def _warm_up(self) -> None:
        info = self.runtime.info
        params = info.fill(GenerationParams(prompt="warm up", num_inference_steps=1, seed=0))
        self.generate(params)  # guided: 2 rows
        if not self.runtime.compiled:
            return
        batches = [[params, params.model_copy(update={"seed": 1})]]  # 4 rows
        if not self.invariant:
            batches.append([params.model_copy(update={"guidance_scale": 0.0})])  # 1 row
        for batch in batches:
            requests = [self.start(p) for p in batch]
            while not all(r.done for r in requests):
                self.tick(requests)


def _rows_agree(engine: BatchEngine, max_rows: int) -> bool:
    """Whether each row of a UNet batch comes out bit for bit the same in every batch from 2 rows to
    `max_rows`, wherever it sits, at the model's default size (random inputs; kernels are chosen by
    shape, not by values). 0.1–0.2 s for the tiny models at 32 rows.
    """
    import torch

    unet = engine.pipe.unet
    info = engine.runtime.info
    config = unet.config
    scale = engine.pipe.vae_scale_factor
    n = max(max_rows, 4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((n, config.in_channels, info.height // scale, info.width // scale), generator=generator)
    embeds = torch.randn((n, info.max_tokens, config.cross_attention_dim), generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator).to(torch.float32)
    x, embeds, t = (v.to(engine.device, engine.dtype if v is not t else torch.float32) for v in (x, embeds, t))
    try:
        with torch.inference_mode():
            whole = engine._unet(x, t, embeds)
            for rows in _cuts(n, (2, 3, 5, 17), (2, 8)):
                if not torch.equal(engine._unet(x[rows], t[rows], embeds[rows]), whole[rows]):
                    return False
        return True
    finally:
        for module in unet.modules():  # forget the random rows in the per-row caches
            if isinstance(getattr(module, "results", None), OrderedDict):
                module.results.clear()


def _decoded_rows_agree(engine: BatchEngine, max_images: int, lone: bool = False) -> bool:
    """Whether the VAE decodes each latent to the same bits in even-sized batches up to
    `max_images` (+1), wherever it sits (random latents at the model's default size); with `lone`,
    whether it does so alone too. Measured: tiny-random's VAE changes rows between odd and even
    batch sizes (alone included), never among even ones; tiny-shapes' gives a lone row its bits.
    """
    import torch

    info, pipe = engine.runtime.info, engine.pipe
    scale = pipe.vae_scale_factor
    n = max_images + max_images % 2
    generator = torch.Generator().manual_seed(0)
    shape = (n, pipe.vae.config.latent_channels, info.height // scale, info.width // scale)
    latents = torch.randn(shape, generator=generator).to(engine.device, engine.dtype)
    with torch.inference_mode():
        whole = engine._vae(latents)
        for rows in _cuts(n, (1,), (1,)) if lone else _cuts(n, (2, 4, 6), (2, 8)):
            one = engine.pipe.vae.decode(latents[rows], return_dict=False)[0] if lone else engine._vae(latents[rows])
            if not torch.equal(one, whole[rows]):
                return False
    return True


def _cuts(n: int, first: tuple[int, ...], last: tuple[int, ...]) -> list[slice]:
    """Sub-batches of an n-row check batch: its first k rows for each k in `first`, and its last k
    rows for each k in `last` (the same rows at other positions)."""
    return [slice(0, k) for k in first if k < n] + [slice(n - k, n) for k in last if k < n]
