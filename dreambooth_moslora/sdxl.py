"""The Stable Diffusion XL base 1.0 UNet's configuration, so the real architecture can be built with random
weights (for benchmarks and key checks) where its weights cannot be downloaded.

Values as in stabilityai/stable-diffusion-xl-base-1.0/unet/config.json: 2.567 B parameters, 70 transformer
blocks, 560 attention projections.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

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


def build_sdxl_unet(device="cpu", dtype=torch.bfloat16, seed: int = 0) -> UNet2DConditionModel:
    """SDXL's UNet with seeded random weights; on device "meta" it costs no memory (for key checks)."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype=dtype)
