"""Prior preservation: class images made by the base model itself, so the class keeps its look (Ruiz et al. 2023)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS
from .files import save_png_atomically

def count_images(folder) -> int:
    folder = Path(folder)
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else 0


def generate_class_images(pipe: StableDiffusionXLPipeline, folder, prompt: str, indices: list[int], batch_size: int,
                          resolution: int, num_inference_steps: int, seed: int, show_progress: bool = True):
    """Write `class-<index>.png` for each index; each image's seed is (seed, index), so processes can share the work."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="generating class images", disable=not show_progress):
        generators = [torch.Generator().manual_seed(seed * 100_003 + index) for index in batch]
        images = pipe(
            [prompt] * len(batch), generator=generators, height=resolution, width=resolution,
            num_inference_steps=num_inference_steps,
        ).images
        for index, image in zip(batch, images):
            save_png_atomically(image, folder / f"class-{index:05d}.png")


def missing_class_indices(folder, wanted: int) -> list[int]:
    """Indices of the class images still to generate, skipping names already taken."""
    have = count_images(folder)
    indices, index = [], 0
    while len(indices) < wanted - have:
        if not (Path(folder) / f"class-{index:05d}.png").exists():
            indices.append(index)
        index += 1
    return indices
