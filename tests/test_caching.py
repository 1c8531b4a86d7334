import pytest
import torch
from diffusers import AutoencoderKL

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.caching import cache_latent_distributions, cache_prompt_embeddings, latents_are_cacheable
from dreambooth_moslora.trainer.conditioning import encode_latent_distribution
from dreambooth_moslora.trainer.data import Example, center_sample, render
from helpers import write_images


def _examples(tmp_path, sizes):
    paths = write_images(tmp_path, sizes=sizes)
    return [Example(p, f"caption {i % 2}", (h, w), (64, 64)) for i, (p, (w, h)) in enumerate(zip(paths, sizes))]


def test_caching_is_automatic_only_when_crops_are_deterministic(tmp_path):
    exact = _examples(tmp_path / "exact", ((64, 64), (128, 128)))
    slack = _examples(tmp_path / "slack", ((96, 64),))
    assert latents_are_cacheable(None, center_crop=False, examples=exact)
    assert not latents_are_cacheable(None, center_crop=False, examples=slack)
    assert latents_are_cacheable(None, center_crop=True, examples=slack)
    assert not latents_are_cacheable(False, center_crop=True, examples=exact)
    with pytest.raises(UserInputError, match="would freeze one random crop"):
        latents_are_cacheable(True, center_crop=False, examples=slack)


def test_latent_cache_holds_both_orientations_of_each_image(tmp_path, tiny_sdxl_dir):
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    examples = _examples(tmp_path, ((96, 64), (64, 64)))
    cache = cache_latent_distributions(vae, examples + examples[:1], random_flip=True)
    assert len(cache) == 4
    mean, std = encode_latent_distribution(vae, render(examples[0], center_sample(examples[0], True))[None])
    torch.testing.assert_close(cache[(examples[0], True)][0], mean[0])
    torch.testing.assert_close(cache[(examples[0], True)][1], std[0])
    assert len(cache_latent_distributions(vae, examples, random_flip=False)) == 2


def test_prompt_cache_encodes_each_caption_once(tiny_pipe):
    cache = cache_prompt_embeddings((tiny_pipe.text_encoder, tiny_pipe.text_encoder_2),
                                    (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2), ["a", "b", "a"], "cpu")
    assert list(cache) == ["a", "b"]
    embeds, pooled = cache["a"]
    assert embeds.shape == (77, 64) and pooled.shape == (32,)
