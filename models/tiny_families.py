"""Builders for tiny random-weight pipelines of the other model families (SDXL, Kandinsky 2.2).

They make noise, but they have the real families' component layouts (two text encoders and
micro-conditioning for SDXL; a CLIP prior, an image encoder and a MoVQ decoder for Kandinsky), so
the service is exercised against each family's real pipeline classes in milliseconds, offline.
Each folder also gets an `imagegen.json` with the family and request defaults the worker reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.tokenizer import MAX_LENGTH, build_clip_tokenizer

DEFAULTS_FILE = "imagegen.json"  # read by worker.runtime (same name)


def _text_config(tokenizer: Any, hidden: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection,
    )


def _write_defaults(out: Path, **defaults: Any) -> None:
    (out / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """SDXL layout: CLIP-L-like and CLIP-G-like text encoders whose hidden states are concatenated
    for cross-attention, plus the pooled projection and size/crop micro-conditioning ("text_time")."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    hidden, projection, time_dim = 8, 8, 4
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding.
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        cross_attention_dim=hidden * 2,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden, projection)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, hidden, projection)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _write_defaults(out, family="sdxl", num_inference_steps=4, guidance_scale=5.0, scheduler="euler")
    return out


def build_tiny_kandinsky(out_dir: str | Path, seed: int = 0) -> Path:
    """Kandinsky 2.2 layout (unCLIP): a prior maps the CLIP text embedding to a CLIP image embedding;
    a UNet conditioned on image embeddings denoises MoVQ latents. The prior's CLIP image encoder also
    turns an input picture into an image embedding (variations)."""
    import torch
    from diffusers import (
        DDIMScheduler,
        KandinskyV22CombinedPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    embed = 16  # CLIP embedding size shared by text encoder, image encoder, prior and decoder
    image_size = 32
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=embed, num_layers=1)
    # Real priors carry the CLIP embedding statistics; neutral ones keep random outputs in range.
    prior.clip_mean = torch.nn.Parameter(torch.zeros(1, embed))
    prior.clip_std = torch.nn.Parameter(torch.ones(1, embed))
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, embed, embed))
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=embed,
            image_size=image_size,
            projection_dim=embed,
            intermediate_size=embed * 2,
            num_attention_heads=2,
            num_channels=3,
            num_hidden_layers=2,
            patch_size=8,
        )
    )
    image_processor = CLIPImageProcessor(
        crop_size=image_size,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size=image_size,
    )
    prior_scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # Kandinsky's decoder also predicts the variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        encoder_hid_dim=embed,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=16,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=4,
        sample_size=16,
    )
    movq = VQModel(
        # MoVQ's spatial norm always uses 32 groups, so 32 channels is its floor.
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    pipe = KandinskyV22CombinedPipeline(
        unet=unet,
        scheduler=scheduler,
        movq=movq,
        prior_prior=prior,
        prior_image_encoder=image_encoder,
        prior_text_encoder=text_encoder,
        prior_tokenizer=tokenizer,
        prior_scheduler=prior_scheduler,
        prior_image_processor=image_processor,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _write_defaults(
        out,
        family="kandinsky-2.2",
        width=32,
        height=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        scheduler="ddim",
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
    )
    return out
