"""The denoising objective: what the UNet should predict, and min-SNR-γ weighting (Hang et al. 2023)."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """ε for epsilon-prediction models (SDXL base), v = α·ε − σ·x₀ for v-prediction ones."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(alphas_cumprod, timesteps, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction; ones without γ."""
    if gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
