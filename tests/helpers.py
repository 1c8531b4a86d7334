"""Small image folders for tests: drawn here, so the tests never depend on files outside the repository."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder, sizes=((96, 64), (64, 96), (80, 80)), seed=0, suffix=".png") -> list[Path]:
    """Random-coloured images of the given (width, height) sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / f"{index:02d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def save_tiny_feature_models(folder) -> tuple[Path, Path]:
    """A tiny random ViT (stands in for DINO) and a tiny random CLIP, each with its processor, saved locally."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from dreambooth_moslora.tiny import tiny_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
    ViTModel(ViTConfig(**vit)).save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vit, projection_dim=16)).save_pretrained(folder / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"
