"""The VAE at 1024 px on a small card. Measured on a GPU, a 1024 px decode in the stock fp32 VAE needs ~4 GiB of
activations and the encode ~3 GiB: on an 8 GiB card that is the run's peak, above the training step's. So a batch
is decoded one image at a time (diffusers' slicing: validation's four samples would need four times that), and
ComfyUI's answer is taken for the image itself: the whole image first, and only when that runs out of memory,
overlapping tiles of half its side, blended at the seams (diffusers' tiling). An image that fits is never changed;
one that does not costs a faint seam instead of the run.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def fit_vae_to_card(vae) -> None:
    """Slice batches, and tile each image that runs out of memory: diffusers' AutoencoderKL slices a batch into
    `_encode`/`_decode` calls of one image each, so those are wrapped (instance attributes, so every pipeline and
    the trainer get them) and only the image that did not fit is retried."""
    vae.enable_slicing()
    for name in ("_encode", "_decode"):
        setattr(vae, name, _with_tiling_fallback(vae, getattr(vae, name), name.lstrip("_")))


def _with_tiling_fallback(vae, whole, name: str):
    def call(tensor: torch.Tensor, *args, **kwargs):
        try:
            return whole(tensor, *args, **kwargs)
        except torch.OutOfMemoryError:
            pass  # retried outside the handler, so the failed attempt's tensors are freed first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("the VAE ran out of memory to %s a %dx%d %s whole; it does so in tiles instead (faint "
                       "seams are possible)", name, tensor.shape[-2], tensor.shape[-1],
                       "latent" if name == "decode" else "image")
        with half_size_tiles(vae, tensor, latent=name == "decode"):
            return whole(tensor, *args, **kwargs)

    return call


@contextlib.contextmanager
def half_size_tiles(vae, tensor: torch.Tensor, latent: bool):
    """diffusers' tiling for one call, with tiles of half the input's longer side (its default tile is SDXL's full
    1024 px, which would not tile a 1024 px image at all)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = max(tensor.shape[-2:]) * (factor if latent else 1)
    sizes = {"use_tiling": True, "tile_sample_min_size": side // 2, "tile_latent_min_size": side // 2 // factor}
    saved = {name: getattr(vae, name) for name in sizes}
    for name, value in sizes.items():
        setattr(vae, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
