"""One micro-batch's denoising loss, from latents and prompt embeddings to the weighted mean: the same function
runs in the trainer and, on the meta device, in the memory plan, so the plan counts the step the trainer takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..adapter.inject import moslora_disabled
from ..pipeline.loss import diffusion_target, min_snr_weights
from .masks import loss_weights


@dataclass(frozen=True)
class LossSettings:
    """The options that shape the loss, as `train` takes them (each sample's weight comes with it: StepInputs)."""

    snr_gamma: float | None = None
    unmasked_weight: float = 0.0
    base_model_prior: bool = False
    """Some examples' target is the frozen base model's own prediction (a second, gradient-free UNet pass)."""


@dataclass
class StepInputs:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    base_model_target: list[bool]
    """Which samples' target is the base model's prediction (the base-model prior's class examples)."""
    masks: torch.Tensor | None = None
    loss_weights: list[float] | None = None
    """Each sample's weight: its concept's, or the prior's for a class example; None weighs all 1."""


def predict(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, dtype: torch.dtype) -> torch.Tensor:
    """The UNet's prediction with SDXL's conditioning, inputs in the frozen weights' dtype."""
    return unet(noisy.to(dtype), timesteps, prompt_embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample


def denoising_loss(unet, noise_scheduler, inputs: StepInputs, settings: LossSettings, dtype: torch.dtype,
                   base_unet=None, base_prompt: Callable | None = None) -> torch.Tensor:
    """The mean weighted loss of the micro-batch. With the base-model prior, `base_unet` (the UNet unwrapped from
    any DDP wrapper) predicts the class examples' target with its adapter off, from `base_prompt()`'s embeddings
    when the text encoders are trained (else the step's own)."""
    batch = inputs.latents.shape[0]
    noisy = noise_scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    prediction = predict(unet, noisy, inputs.timesteps, inputs.prompt_embeds, inputs.pooled, inputs.time_ids, dtype)
    target = diffusion_target(noise_scheduler, inputs.latents, inputs.noise, inputs.timesteps)
    device = prediction.device
    base_target = torch.tensor(inputs.base_model_target, device=device)
    if settings.base_model_prior and any(inputs.base_model_target):
        target = torch.where(base_target[:, None, None, None],
                             _base_prediction(base_unet or unet, noisy, inputs, dtype, base_prompt).to(target.dtype),
                             target)
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if inputs.masks is not None:
        errors = errors * loss_weights(inputs.masks.to(device), errors.shape[-2:], settings.unmasked_weight)
    per_sample = errors.mean(dim=(1, 2, 3))
    weights = torch.tensor(inputs.loss_weights or [1.0] * batch, device=device) * min_snr_weights(
        noise_scheduler.alphas_cumprod, inputs.timesteps, settings.snr_gamma,
        noise_scheduler.config.prediction_type)
    return (per_sample * weights).mean()


@torch.no_grad()
def _base_prediction(unet, noisy, inputs: StepInputs, dtype, base_prompt):
    prompt_embeds, pooled = base_prompt() if base_prompt is not None else (inputs.prompt_embeds, inputs.pooled)
    with moslora_disabled(unet):
        return predict(unet, noisy, inputs.timesteps, prompt_embeds, pooled, inputs.time_ids, dtype)
