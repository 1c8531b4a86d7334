"""Prior preservation, so the class keeps its look while the subject is learned (Ruiz et al. 2023).

Two ways: class images made by the base model itself (DreamBooth's), or no images at all, the frozen base model's
own prediction for the class on the instance images' noisy latents being the target (ai-toolkit's differential
output preservation, OneTrainer's prior prediction).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from ..adapter.feedback import progress_bar
from ..adapter.files import save_png_atomically, write_text_atomically
from .data import IMAGE_EXTENSIONS, Example
from .prompt_words import prompt_words, trigger_words


def count_images(folder) -> int:
    folder = Path(folder)
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else 0


def generate_class_images(pipe: StableDiffusionXLPipeline, folder, prompts: list[str], indices: list[int],
                          batch_size: int, resolution: int, num_inference_steps: int, seed: int,
                          show_progress: bool = True):
    """Write `class-<index>.png` and its caption `class-<index>.txt` for each index: prompt (index mod the number
    of prompts), seed (seed, index), so processes can share the work and any image can be made again alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in progress_bar(batches, desc="generating class images", show=show_progress):
        generators = [torch.Generator().manual_seed(seed * 100_003 + index) for index in batch]
        captions = [prompts[index % len(prompts)] for index in batch]
        images = pipe(
            captions, generator=generators, height=resolution, width=resolution,
            num_inference_steps=num_inference_steps,
        ).images
        for index, image, caption in zip(batch, images, captions):
            write_text_atomically(folder / f"class-{index:05d}.txt", caption + "\n")
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


def base_model_prior_examples(instance: list[Example], instance_prompt: str, class_prompt: str,
                              class_prompts: list[str] | None = None, loss_weight: float = 1.0) -> list[Example]:
    """The instance images as class examples. Captioned with the class prompts when there are several (image
    i mod n with prompt i, one example per prompt); else each with its own caption less the trigger words (see
    trigger_words: ordinary words stay even when the class prompt lacks them, so "dog" survives a class prompt
    that says "puppy"): "a photo of sks dog on a beach" → "a photo of dog on a beach". Each weighs loss_weight."""
    prior = dict(is_class=True, mask=None, loss_weight=loss_weight, base_model_target=True)
    if class_prompts:
        return [replace(instance[i % len(instance)], caption=prompt, **prior) for i, prompt in enumerate(class_prompts)]
    trigger = trigger_words(instance_prompt, class_prompt)
    return [replace(e, caption=without_words(e.caption, trigger), **prior) for e in instance]


def without_words(caption: str, words: set[str]) -> str:
    """The caption less each whitespace-separated token made only of these words (any case, with its punctuation)."""
    return " ".join(t for t in caption.split() if not prompt_words(t) or not set(prompt_words(t)) <= words)
