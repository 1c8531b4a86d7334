"""The Stable Diffusion XL base 1.0 configurations, so the real architecture can be built with random weights (for
benchmarks, key checks and memory plans) where its weights cannot be downloaded.

Values as in stabilityai/stable-diffusion-xl-base-1.0's config files: the UNet has 2.567 B parameters, 70
transformer blocks and 560 attention projections; the text encoders 123 M (CLIP ViT-L) and 695 M (OpenCLIP
ViT-bigG); the VAE 84 M.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_TEXT_EMBED_DIM = 1280  # the pooled embedding of the second text encoder
SDXL_TEXT_ENCODER_CONFIGS = (
    {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768},
    {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280},
)
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}


def build_sdxl_unet(device="cpu", dtype=torch.bfloat16, seed: int = 0) -> UNet2DConditionModel:
    """SDXL's UNet with seeded random weights; on device "meta" it costs no memory (for key checks)."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype=dtype)


def save_random_sdxl_pipeline(path, seed: int = 0) -> Path:
    """A diffusers folder of SDXL's architecture with seeded random weights (UNet and text encoders bf16, VAE
    fp32, 7 GB), which `train` loads as it loads the real one: for measuring the trainer on a GPU. Its tokenizers
    are the tiny pipeline's (every id they give is in the encoders' range)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..adapter.files import save_pretrained_readable
    from .tiny import sdxl_scheduler, tiny_clip_tokenizer

    unet = build_sdxl_unet(dtype=torch.bfloat16, seed=seed)
    text_encoders = [model(CLIPTextConfig(**config)).to(torch.bfloat16) for model, config in
                     zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_ENCODER_CONFIGS)]
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE_CONFIG), text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=sdxl_scheduler())
    return save_pretrained_readable(pipe, path)
