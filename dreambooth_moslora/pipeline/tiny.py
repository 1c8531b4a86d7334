"""A tiny Stable Diffusion XL pipeline: the real component classes at toy sizes, seeded random weights.

It stands in for `stabilityai/stable-diffusion-xl-base-1.0` in the tests, where no weights can be downloaded (the
quick start uses the pretrained mini model in assets/mini-sdxl instead): same classes, same conditioning (two CLIP
text encoders, `text_time` micro-conditioning), same loading path (`from_pretrained` on a folder). Its images are
noise; it exercises the code, not quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..adapter.files import save_pretrained_readable

TEXT_HIDDEN = 32
TEXT_2_HIDDEN = 32
TEXT_2_PROJECTION = 32
TIME_EMBED_DIM = 8


def byte_unicode_map() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, so any text has a token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte, alone and word-final, plus the two special tokens."""
    symbols = list(byte_unicode_map().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(hidden: int, vocab_size: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler config: Euler, scaled-linear betas 0.00085-0.012, ε-prediction."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's layout in miniature: 3 down blocks (the first without attention), 2 layers per block."""
    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN + TEXT_2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_2_PROJECTION + 6 * TIME_EMBED_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_text_config(TEXT_HIDDEN, vocab_size, TEXT_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_2_HIDDEN, vocab_size, TEXT_2_PROJECTION))
    scheduler = sdxl_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_sdxl_pipeline(path, seed: int = 0) -> Path:
    """Write the tiny pipeline in diffusers' folder layout; `StableDiffusionXLPipeline.from_pretrained` loads it."""
    return save_pretrained_readable(build_tiny_sdxl_pipeline(seed), path)
