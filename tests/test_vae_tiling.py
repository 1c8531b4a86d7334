import logging

import pytest
import torch
from diffusers import AutoencoderKL

from dreambooth_moslora.pipeline.vae_tiling import fit_vae_to_card

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' tiled_encode deprecation note


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=64).eval()


def small_card(vae, largest_side: int):
    """The card of a smaller GPU: the encoder and decoder run out of memory above largest_side (their input's)."""
    seen = []
    for part in (vae.encoder, vae.decoder):
        def refuse_large(module, inputs, part=part):
            seen.append((part is vae.encoder, tuple(inputs[0].shape[-2:])))
            if max(inputs[0].shape[-2:]) > largest_side:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        part.register_forward_pre_hook(refuse_large)
    return seen


def test_what_fits_is_computed_whole_and_unchanged():
    vae, plain = tiny_vae(), tiny_vae()
    fit_vae_to_card(vae)
    image, latent = torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(latent).sample, plain.decode(latent).sample)
        assert torch.equal(vae.encode(image).latent_dist.mean, plain.encode(image).latent_dist.mean)


def test_a_decode_out_of_memory_is_done_in_half_size_tiles(caplog):
    vae, plain = tiny_vae(), tiny_vae()
    fit_vae_to_card(vae)
    seen = small_card(vae, largest_side=4)  # an 8x8 latent does not fit; a 4x4 tile does
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        decoded = vae.decode(latent).sample
        whole = plain.decode(latent).sample
    assert decoded.shape == whole.shape == (1, 3, 64, 64)
    assert seen[0] == (False, (8, 8)) and len(seen) > 2  # the whole, refused, then the tiles
    assert max(max(shape) for _, shape in seen[1:]) == 4
    assert torch.isfinite(decoded).all()
    assert "ran out of memory to decode a 8x8 latent" in caplog.text
    assert vae.use_tiling is False and vae.tile_latent_min_size == plain.tile_latent_min_size  # for this call only


def test_an_encode_out_of_memory_is_done_in_tiles():
    vae, plain = tiny_vae(), tiny_vae()
    fit_vae_to_card(vae)
    small_card(vae, largest_side=32)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        whole = plain.encode(image).latent_dist.mean
    assert mean.shape == whole.shape == (1, 4, 8, 8)
    assert torch.isfinite(mean).all() and not vae.use_tiling


def test_an_error_other_than_memory_is_not_retried():
    vae = tiny_vae()
    fit_vae_to_card(vae)
    with pytest.raises(RuntimeError, match="channels"):
        vae.decode(torch.randn(1, 3, 8, 8))  # a latent of the wrong channel count


def test_a_batch_is_decoded_one_image_at_a_time():
    """Validation samples four images at a time by default: four whole 1024 px decodes at once would be the peak."""
    vae, plain = tiny_vae(), tiny_vae()
    fit_vae_to_card(vae)
    batch = []
    vae.decoder.register_forward_pre_hook(lambda module, inputs: batch.append(inputs[0].shape[0]))
    latents = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        assert torch.allclose(decoded, plain.decode(latents).sample, atol=1e-5)
    assert batch == [1, 1, 1]


def test_in_a_batch_only_the_image_that_ran_out_is_tiled(caplog):
    vae, plain = tiny_vae(), tiny_vae()
    fit_vae_to_card(vae)
    calls = []

    def second_whole_image_runs_out(module, inputs):
        calls.append(tuple(inputs[0].shape[-2:]))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    vae.decoder.register_forward_pre_hook(second_whole_image_runs_out)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        decoded = vae.decode(latents).sample
        whole = torch.cat([plain.decode(latent[None]).sample for latent in latents])
    assert torch.equal(decoded[0], whole[0])  # the first image fitted and is not redone
    assert calls[:3] == [(8, 8), (8, 8), (4, 4)] and len(calls) > 3  # the second whole, refused, then its tiles
    assert not torch.equal(decoded[1], whole[1]) and torch.isfinite(decoded[1]).all()
    assert caplog.text.count("ran out of memory") == 1
