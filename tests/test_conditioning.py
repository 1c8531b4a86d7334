import torch
from diffusers import AutoencoderKL

from dreambooth_moslora.trainer.conditioning import encode_latent_distribution, encode_prompts, micro_conditioning, sample_latents


def test_prompt_embedding_joins_both_encoders_penultimate_states(tiny_pipe):
    embeds, pooled = encode_prompts((tiny_pipe.text_encoder, tiny_pipe.text_encoder_2),
                                    (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2), ["a photo of sks dog"], "cpu")
    reference, _, reference_pooled, _ = tiny_pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, reference)
    torch.testing.assert_close(pooled, reference_pooled)


def test_the_empty_prompt_is_sdxls_unconditional_embedding_zeros(tiny_pipe):
    """A dropped caption must train the branch the pipeline's guidance subtracts: zeros, not the encoded ""."""
    embeds, pooled = encode_prompts((tiny_pipe.text_encoder, tiny_pipe.text_encoder_2),
                                    (tiny_pipe.tokenizer, tiny_pipe.tokenizer_2), ["", "a photo of sks dog"], "cpu")
    _, unconditional, _, unconditional_pooled = tiny_pipe.encode_prompt("a photo of sks dog")
    assert tiny_pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(embeds[:1], unconditional)
    torch.testing.assert_close(pooled[:1], unconditional_pooled)
    assert embeds[0].abs().sum() == 0 and pooled[0].abs().sum() == 0
    assert embeds[1].abs().sum() > 0 and pooled[1].abs().sum() > 0


def test_micro_conditioning_order():
    assert micro_conditioning((480, 640), (0, 32), (448, 576)) == [480, 640, 0, 32, 448, 576]


def test_latents_are_drawn_from_the_posterior_and_scaled(tiny_sdxl_dir):
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    mean, std = encode_latent_distribution(vae, pixels)
    assert mean.shape == std.shape == (1, 4, 8, 8) and (std > 0).all()
    noise = torch.randn_like(mean)
    torch.testing.assert_close(sample_latents(mean, std, noise, vae.config), (mean + std * noise) * 0.13025)
