import torch
from diffusers import DDPMScheduler

from dreambooth_moslora.pipeline.loss import diffusion_target, min_snr_weights


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def test_epsilon_models_predict_the_noise_and_v_models_the_velocity():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert torch.equal(diffusion_target(_scheduler(), latents, noise, timesteps), noise)
    scheduler = _scheduler("v_prediction")
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps), alpha * noise - sigma * latents)


def test_min_snr_weights():
    scheduler = _scheduler()
    timesteps = torch.tensor([0, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, timesteps, None, "epsilon"), torch.ones(3))
    weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, "epsilon")
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1 and weights[2] == 1  # low noise (high SNR) is down-weighted, high noise is not
    v_weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, "v_prediction")
    torch.testing.assert_close(v_weights, torch.clamp(snr, max=5.0) / (snr + 1))
