"""`sd15-random` has Stable Diffusion 1.5's architecture: checked on PyTorch's meta device (shapes only,
no memory), since the real build writes 2 GB. The build itself is run by the GPU benchmark."""

from __future__ import annotations

from models.registry import REGISTRY
from models.sd15 import UNET_PARAMETERS, VAE_PARAMETERS, sd15_models, sd15_scheduler
from models.tokenizer import MAX_LENGTH, build_clip_tokenizer

# CLIP ViT-L/14's text encoder as SD 1.5 ships it (49,408 tokens).
SD15_TEXT_PARAMETERS = 123_060_480
SD15_VOCAB = 49_408


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_models_have_sd15s_published_sizes() -> None:
    import torch

    tokenizer = build_clip_tokenizer()
    with torch.device("meta"):
        models = sd15_models(tokenizer)
    assert _count(models["unet"]) == UNET_PARAMETERS == 859_520_964
    assert _count(models["vae"]) == VAE_PARAMETERS == 83_653_863
    # Only the token table differs from SD's text encoder: one 768-wide row per token.
    assert _count(models["text_encoder"]) == SD15_TEXT_PARAMETERS - (SD15_VOCAB - len(tokenizer)) * 768
    unet = models["unet"].config
    assert (unet.sample_size, unet.cross_attention_dim, unet.attention_head_dim) == (64, 768, 8)
    assert models["text_encoder"].config.max_position_embeddings == MAX_LENGTH
    assert 2 ** (len(models["vae"].config.block_out_channels) - 1) * unet.sample_size == 512


def test_it_samples_with_sd15s_betas_as_dpmpp_2m_at_512px() -> None:
    scheduler = sd15_scheduler()
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.algorithm_type, config.steps_offset, config.num_train_timesteps) == ("dpmsolver++", 1, 1000)
    entry = REGISTRY["sd15-random"]
    assert entry.builder == "models.sd15:build_sd15_random"
    assert (entry.width, entry.height, entry.num_inference_steps, entry.guidance_scale) == (512, 512, 25, 7.5)


def test_the_build_makes_its_weights_in_float16_from_the_start(tmp_path, monkeypatch) -> None:
    """Built in float32 and then cast, sd15-random peaked at 4.4 GB of memory (2.4 GB in float16).
    The real build is stood in for by the same models on the meta device."""
    import pytest
    import torch

    from models import sd15

    real = sd15.sd15_models
    made: dict[str, set] = {}

    class Stop(Exception):
        pass

    def on_meta(*args, **kwargs):
        with torch.device("meta"):
            models = real(*args, **kwargs)
        made["dtypes"] = {p.dtype for model in models.values() for p in model.parameters()}
        raise Stop

    monkeypatch.setattr(sd15, "sd15_models", on_meta)
    with pytest.raises(Stop):
        sd15.build_sd15_random(tmp_path / "sd15")
    assert made["dtypes"] == {torch.float16}
    assert torch.get_default_dtype() == torch.float32  # put back after construction
