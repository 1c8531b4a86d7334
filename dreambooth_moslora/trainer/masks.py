"""Masked loss: the subject's pixels count, the background's count less (kohya's --masked_loss, OneTrainer's
masked training), so backgrounds are not learned as part of the subject.

A mask is a same-named image in a mask folder (white is the subject; any of the image extensions) or the photo's
own alpha channel. It follows the photo through resize, crop and flip, then shrinks to latent size by area.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..adapter.errors import UserInputError
from .data import IMAGE_EXTENSIONS, Example, Sample, place


def mask_finder(mask_dir=None, alpha_mask: bool = False):
    """A function from an instance photo to its mask source, refusing a photo that has none; None when unmasked."""
    if alpha_mask:
        def alpha(path: Path) -> Path:
            with Image.open(path) as image:
                if "A" not in image.getbands() and "transparency" not in image.info:
                    raise UserInputError(f"--alpha_mask: {path} has no alpha channel")
            return path
        return alpha
    if mask_dir is None:
        return None
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise UserInputError(f"--mask_dir not found: {folder}")

    def from_folder(path: Path) -> Path:
        for extension in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{path.stem}{extension}", folder / f"{path.stem}{extension.upper()}"):
                if candidate.is_file():
                    return candidate
        raise UserInputError(f"--mask_dir {folder} has no mask for {path.name} (looked for {path.stem}.png and the like)")
    return from_folder


def load_mask(example: Example) -> Image.Image:
    """The mask as 8-bit grayscale at the photo's size (EXIF-rotated like the photo)."""
    with Image.open(example.mask) as image:
        image = ImageOps.exif_transpose(image)
        if example.mask == example.path:
            mask = image.convert("RGBA").getchannel("A")
        else:
            mask = image.convert("L")
    if mask.size != (example.original_size[1], example.original_size[0]):
        mask = mask.resize((example.original_size[1], example.original_size[0]), Image.Resampling.BILINEAR)
    return mask


def render_mask(example: Example, sample: Sample) -> torch.Tensor:
    """(1, H, W) in [0, 1] at the bucket's size; all ones for an example without a mask (class images)."""
    height, width = example.target_size
    if example.mask is None:
        return torch.ones(1, height, width)
    placed = place(load_mask(example), example, sample, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(placed, dtype=np.float32) / 255.0)[None]


def loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """(B, 1, h, w) per-latent-pixel loss weights: 1 on the subject, unmasked_weight on the rest."""
    coverage = F.interpolate(masks, size=latent_size, mode="area")
    return unmasked_weight + (1 - unmasked_weight) * coverage
