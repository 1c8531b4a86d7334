"""Encode once what does not change while training: each image's VAE posterior, each prompt's embeddings.

The cached posterior (mean, std) is still sampled every step, so caching changes the speed, never the loss.
"""

from __future__ import annotations

import torch

from ..adapter.errors import UserInputError
from ..adapter.feedback import progress_bar
from .conditioning import encode_latent_distribution, encode_prompts
from .data import Example, center_sample, has_crop_slack, render


def latents_are_cacheable(requested: bool | None, center_crop: bool, examples: list[Example]) -> bool:
    """Automatic (None): cache unless random crops need a fresh encoding every step."""
    random_crops = not center_crop and any(has_crop_slack(e) for e in examples)
    if requested and random_crops:
        raise UserInputError("--cache_latents would freeze one random crop per image; add --center_crop, "
                             "or leave caching off")
    return not random_crops if requested is None else requested


@torch.no_grad()
def cache_latent_distributions(vae, examples: list[Example], random_flip: bool, show_progress: bool = False) -> dict:
    """(example, flipped) → (mean, std) of the VAE posterior of its centre crop, both orientations if flipping."""
    cache = {}
    jobs = [(example, flip) for example in dict.fromkeys(examples) for flip in ((False, True) if random_flip else (False,))]
    for example, flip in progress_bar(jobs, desc="caching latents", show=show_progress):
        mean, std = encode_latent_distribution(vae, render(example, center_sample(example, flip))[None])
        cache[(example, flip)] = (mean[0].cpu(), std[0].cpu())
    return cache


@torch.no_grad()
def cache_prompt_embeddings(text_encoders, tokenizers, captions, device, show_progress: bool = False) -> dict:
    """caption → (prompt embeddings, pooled embedding), encoded once each."""
    cache = {}
    for caption in progress_bar(list(dict.fromkeys(captions)), desc="caching prompts", show=show_progress):
        embeds, pooled = encode_prompts(text_encoders, tokenizers, [caption], device)
        cache[caption] = (embeds[0], pooled[0])
    return cache
