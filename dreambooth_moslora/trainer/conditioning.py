"""SDXL's conditioning of one training step: prompt embeddings, pooled embedding, micro-conditioning, latents.

The cached and the uncached paths call the same functions, so caching changes speed, never the result.
"""

from __future__ import annotations

import torch


def encode_prompts(text_encoders, tokenizers, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt embedding: both encoders' penultimate hidden states side by side, and the second's pooled output.
    The empty prompt (a dropped caption) is all zeros: SDXL's unconditional embedding, which it was trained with and
    which diffusers' SDXL pipeline samples the branch classifier-free guidance subtracts from
    (force_zeros_for_empty_prompt); encoding "" would train a branch sampling never uses."""
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        output = text_encoder(ids, output_hidden_states=True)
        pooled = output[0]
        hidden_states.append(output.hidden_states[-2])
    unconditional = torch.tensor([prompt == "" for prompt in prompts], device=pooled.device)
    embeds = torch.cat(hidden_states, dim=-1).masked_fill(unconditional[:, None, None], 0.0)
    return embeds, pooled.masked_fill(unconditional[:, None], 0.0)


def micro_conditioning(original_size, crop_top_left, target_size) -> list[int]:
    """SDXL's add_time_ids: (original h, w, crop top, left, target h, w)."""
    return [*original_size, *crop_top_left, *target_size]


@torch.no_grad()
def encode_latent_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std; training samples from it every step, cached or not."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def sample_latents(mean, std, noise: torch.Tensor, vae_config) -> torch.Tensor:
    """A latent drawn from the posterior, scaled (and shifted) as the UNet was trained on."""
    latents = mean + std * noise
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor
