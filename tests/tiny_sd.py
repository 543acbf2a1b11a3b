"""A tiny random Stable Diffusion pipeline built from configs and saved with ``save_pretrained``: the stand-in for
a real checkpoint in test_sd.py and test_cli.py (the ``sd_dir`` fixture in conftest.py). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from avalanche_drcpsd.text_encoders import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

RES, HIDDEN = 16, 32  # image side (latents 4 x 8 x 8: a VAE with 2 levels halves once), text width


def build_tiny_sd(directory: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A StableDiffusionPipeline of tiny random networks built from configs, saved with save_pretrained."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=RES)
    unet = UNet2DConditionModel(sample_size=RES // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
                                attention_head_dim=4, norm_num_groups=8)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory
