"""`sd15-random`: a pipeline with Stable Diffusion 1.5's architecture and random weights, built offline.

The UNet, VAE and text encoder follow the configs published with SD 1.5 (UNet 859.5 M parameters,
VAE 83.7 M, CLIP ViT-L/14 text encoder); only the tokenizer is this repo's small CLIP BPE
(`models.tokenizer`), so the text encoder's token table has fewer rows than SD's 49,408, which
changes no step's cost. The images are noise: the model exists to measure the service at SD 1.5's
real size (GPU benchmarks, `bench/README.md`) where no checkpoint can be downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.tokenizer import MAX_LENGTH, build_clip_tokenizer

# Parameter counts of SD 1.5's published UNet and VAE (the text encoder's depends on the vocabulary).
UNET_PARAMETERS = 859_520_964
VAE_PARAMETERS = 83_653_863


def sd15_models(tokenizer: Any, dtype: Any = None) -> dict[str, Any]:
    """SD 1.5's UNet, VAE and text encoder, freshly initialised (call under `torch.device("meta")` to get
    the shapes without the memory). With `dtype` (e.g. `torch.float16`) the parameters are created and
    initialised in it, never as float32 first."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        return _sd15_models(tokenizer)
    finally:
        torch.set_default_dtype(previous)


def _sd15_models(tokenizer: Any) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def sd15_scheduler() -> Any:
    """DPM-Solver++ 2M on the betas and step offset of SD 1.5's published (PNDM) sampler config: the
    sampler the registry's `sd-1.5` entry defaults to, so the raw pipeline and the service sample alike."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        algorithm_type="dpmsolver++",
    )


def build_sd15_random(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the random SD-1.5-sized pipeline and save it in float16 (about 2.1 GB); returns the folder."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    # Made in float16 from the start: a float32 build then cast peaked at 4.4 GB of memory.
    models = sd15_models(tokenizer, dtype=torch.float16)
    pipe = StableDiffusionPipeline(
        **models,
        scheduler=sd15_scheduler(),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    # Half the bytes to write and read; a CPU worker loads them back as float32.
    pipe.save_pretrained(out, safe_serialization=True)
    return out
