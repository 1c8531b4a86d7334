"""The mini SDXL: the real SDXL component classes sized for 32 px images of the world, before pretraining.

The VAE halves the resolution (32 px images, 16x16x4 latents); the UNet keeps SDXL's layout (no attention in
the first, full-resolution level; `text_time` micro-conditioning fed by the second encoder's pooled output)
and the pipeline encodes prompts with both CLIP encoders' penultimate layers, exactly as SDXL does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..adapter.files import save_pretrained_readable, write_text_atomically
from ..pipeline.tiny import sdxl_scheduler
from .render import IMAGE_SIZE
from .vocabulary import build_world_tokenizer

TEXT_HIDDEN = 64
TIME_EMBED_DIM = 32


def _text_config(vocab_size: int, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_mini_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=16,
        cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * TIME_EMBED_DIM,
    )


def build_mini_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_mini_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Untrained: seeded initial weights for `pretrain_world_model` to start from."""
    tokenizer = build_world_tokenizer()
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=build_mini_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=build_world_tokenizer(),
        unet=build_mini_unet(),
        scheduler=sdxl_scheduler(),
    )


def save_mini_sdxl_pipeline(pipe: StableDiffusionXLPipeline, path) -> Path:
    """Weights stored in fp16 (half the size), every component loading in fp32 by default.

    diffusers loads the UNet and VAE in fp32 unless told otherwise, but transformers loads a text encoder in the
    dtype its config records; so the configs say fp32, and the plain `from_pretrained(path)` samples on a CPU.
    """
    path = save_pretrained_readable(pipe.to(torch.float16), path)
    for name in ("text_encoder", "text_encoder_2"):
        config = path / name / "config.json"
        values = json.loads(config.read_text())
        values["dtype"] = "float32"
        write_text_atomically(config, json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path
