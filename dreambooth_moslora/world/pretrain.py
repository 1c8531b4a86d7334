"""Pretraining the mini SDXL on the world, reproducibly from a seed: the VAE first, then the UNet together
with both text encoders (they start from scratch, unlike SDXL's CLIP, so they learn the world's words), then both
again on a world whose objects are also striped, dotted or checked, then the VAE's decoder again on patterned
objects too.

One in seven (shape, colour, background) combinations never appears in pretraining; sampling those held-out
combinations and reading the results with the analyzer measures whether the model composes what it learned.
Training matches what the pipeline does at inference: prompts padded to 77 tokens, both encoders' penultimate
layers, pooled output and micro-conditioning as SDXL, and an empty prompt encoded as zeros (SDXL's
`force_zeros_for_empty_prompt`) for the 10% of captions dropped so classifier-free guidance works.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..pipeline.loss import min_snr_weights
from ..trainer.conditioning import encode_prompts, micro_conditioning
from .analyzer import WorldAnalyzer, accuracy
from .model import build_mini_sdxl_pipeline
from .render import (COLOURS, IMAGE_SIZE, SHAPES, TEXTURE_WORDS, Scene, render, render_patterned, sample_scene,
                     to_pixels)
from .subjects import ALL_SUBJECTS

HELD_OUT_EVERY = 7


def is_held_out(shape: str, colour: str, background: str) -> bool:
    index = list(SHAPES).index(shape) + 3 * list(COLOURS).index(colour) + 5 * list(COLOURS).index(background)
    return index % HELD_OUT_EVERY == 0


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [
        (shape, colour, background)
        for shape in SHAPES for colour in COLOURS for background in COLOURS
        if colour != background and is_held_out(shape, colour, background)
    ]


def training_scene(rng: np.random.Generator) -> Scene:
    while True:
        scene = sample_scene(rng)
        if not is_held_out(scene.shape, scene.colour, scene.background):
            return scene


def held_out_scenes(rng: np.random.Generator, count: int, texture: str = "plain") -> list[Scene]:
    combinations = held_out_combinations()
    picks = rng.choice(len(combinations), size=count, replace=count > len(combinations))
    return [sample_scene(rng, *combinations[i], texture=texture) for i in picks]


@dataclass
class PretrainSettings:
    seed: int = 0
    vae_steps: int = 800
    vae_batch_size: int = 24
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-5
    steps: int = 3600
    batch_size: int = 32
    learning_rate: float = 8e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    decoder_steps: int = 1200
    decoder_learning_rate: float = 3e-4
    pattern_steps: int = 1200
    pattern_learning_rate: float = 4e-4


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, settings: PretrainSettings, rng: np.random.Generator, log=print):
    """Reconstruction (L1 + MSE) with a small KL term, as latent-diffusion VAEs are trained."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    vae.train()
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_learning_rate * _cosine(step, settings.vae_steps, 50)
        pixels = to_pixels([render(training_scene(rng)) for _ in range(settings.vae_batch_size)])
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        reconstruction = F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels)
        loss = reconstruction + settings.kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step}: reconstruction {reconstruction.item():.4f}")
    vae.eval().requires_grad_(False)


PATTERN_WORDS = {"stripes": "striped", "dots": "dotted", "checks": "checked"}
SUBJECT_PATTERNS = frozenset((s.pattern, frozenset(s.colours)) for s in ALL_SUBJECTS)
"""Every subject's pattern in its two colours: the pattern stage never shows them, so a subject stays new."""


def plain_example(rng: np.random.Generator):
    """A training scene's render and caption."""
    scene = training_scene(rng)
    return render(scene), scene.caption


def patterned_example(rng: np.random.Generator, unseen=frozenset()):
    """A training scene, half the time with its object filled with stripes, dots or checks of its colour and
    another, never a (pattern, colours) of `unseen`; the caption names them ("a photo of a red and yellow striped
    star on a blue background")."""
    scene = training_scene(rng)
    if rng.random() < 0.5:
        return render(scene), scene.caption
    while True:
        other = str(rng.choice([c for c in COLOURS if c not in (scene.colour, scene.background)]))
        pattern = str(rng.choice(list(PATTERN_WORDS)))
        if (pattern, frozenset((scene.colour, other))) not in unseen:
            break
    caption = (f"a photo of a {scene.colour} and {other} {PATTERN_WORDS[pattern]} {scene.shape} on a "
               f"{TEXTURE_WORDS[scene.texture]}{scene.background} background")
    return render_patterned(scene, pattern, (scene.colour, other)), caption


def patterned_render(rng: np.random.Generator):
    """What the decoder is tuned on: the objects of the world are plain, but a VAE that stands in for SDXL's must
    carry any picture."""
    return patterned_example(rng)[0]


def finetune_decoder(vae, settings: PretrainSettings, log=print):
    """The decoder alone, on patterned objects as well as plain ones (as Stable Diffusion's ft-MSE VAE was tuned):
    with the encoder frozen the latents do not change, so a UNet pretrained on them stays valid. Without it the
    decoder, which only ever saw plain objects, turns a dotted or striped subject into a blob of its mixed
    colours, whatever the UNet learned."""
    rng = np.random.default_rng(settings.seed + 2000)
    generator = torch.Generator().manual_seed(settings.seed + 2000)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=settings.decoder_learning_rate, weight_decay=0.0)
    vae.train()
    for step in range(settings.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.decoder_learning_rate * _cosine(step, settings.decoder_steps, 50)
        pixels = to_pixels([patterned_render(rng) for _ in range(settings.vae_batch_size)])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        decoded = vae.decode(latents).sample
        reconstruction = F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels)
        reconstruction.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == settings.decoder_steps - 1:
            log(f"decoder step {step}: reconstruction {reconstruction.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_scale(vae, rng: np.random.Generator, count: int = 512) -> float:
    """SDXL's scaling_factor idea: latents times it have unit variance, which the noise schedule assumes."""
    pixels = to_pixels([render(training_scene(rng)) for _ in range(count)])
    scale = 1.0 / vae.encode(pixels).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=scale)
    return scale


def _time_ids(count: int) -> torch.Tensor:
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return torch.tensor([micro_conditioning(size, (0, 0), size)] * count, dtype=torch.float32)


def train_denoiser(pipe, settings: PretrainSettings, rng: np.random.Generator, log=print, example=plain_example) -> dict:
    """UNet and both text encoders with ε-prediction and min-SNR weighting, on `example(rng)`'s (image, caption)
    pairs; returns EMA weights by model."""
    vae, unet = pipe.vae, pipe.unet
    encoders, tokenizers = (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)
    trained = {"unet": unet, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    for model in trained.values():
        model.train().requires_grad_(True)
    params = [p for model in trained.values() for p in model.parameters()]
    ema = {name: copy.deepcopy(model).eval().requires_grad_(False) for name, model in trained.items()}
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _cosine(step, settings.steps, settings.warmup_steps)
        images, captions = zip(*(example(rng) for _ in range(settings.batch_size)))
        with torch.no_grad():
            posterior = vae.encode(to_pixels(images)).latent_dist
            latents = posterior.sample(generator) * vae.config.scaling_factor
        kept = torch.rand(len(captions), generator=generator) >= settings.caption_dropout
        prompt_embeds, pooled = encode_prompts(encoders, tokenizers, list(captions), "cpu")
        prompt_embeds, pooled = prompt_embeds * kept[:, None, None], pooled * kept[:, None]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy, timesteps, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": _time_ids(len(captions))}
        ).sample
        weights = min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, settings.min_snr_gamma, "epsilon")
        loss = (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            for name, model in trained.items():
                for averaged, current in zip(ema[name].parameters(), model.parameters()):
                    averaged.lerp_(current, 1 - decay)
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"denoiser step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    return ema


@torch.no_grad()
def sample_world(pipe, prompts: list[str], seed: int, steps: int = 20, guidance_scale: float = 5.0, batch_size: int = 64):
    """The pipeline's own sampling (Euler, 32 px), in batches, seeded once."""
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        images += pipe(
            prompts[start : start + batch_size], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
            guidance_scale=guidance_scale, generator=generator,
        ).images
    return images


@torch.no_grad()
def vae_round_trip(pipe, images) -> list:
    """The images encoded (posterior mean) and decoded again: the best any sample of the pipeline can look."""
    latents = pipe.vae.encode(to_pixels(images).to(pipe.vae.dtype)).latent_dist.mean
    return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample.float(), output_type="pil")


def evaluate_world_model(pipe, analyzer: WorldAnalyzer, count: int = 256, seed: int = 1, steps: int = 20,
                         guidance_scale: float = 5.0) -> dict:
    """How often the analyzer reads the prompt's shape, colour and background off samples of held-out prompts,
    next to its accuracy on renders of the same scenes and on their VAE round trips (the ceilings)."""
    scenes = held_out_scenes(np.random.default_rng(seed), count)
    renders = [render(s) for s in scenes]
    round_trips = vae_round_trip(pipe, renders)
    sampling = {"steps": steps, "guidance_scale": guidance_scale}
    samples = sample_world(pipe, [s.caption for s in scenes], seed, **sampling)
    return {
        "held_out_prompts": count,
        "renders": accuracy(analyzer, renders, scenes),
        "vae_round_trips": accuracy(analyzer, round_trips, scenes),
        "samples": accuracy(analyzer, samples, scenes),
        "sampling": sampling,
    }


def learn_patterns(pipe, settings: PretrainSettings, log=print):
    """UNet and text encoders trained on, as SDXL's know striped, dotted and checked things: half the objects
    patterned in two colours and captioned so, never in a subject's pattern and colours. The world's objects are
    plain, and a model that never drew a pattern must learn patterns themselves from a subject's five photos."""
    stage = replace(settings, steps=settings.pattern_steps, learning_rate=settings.pattern_learning_rate, warmup_steps=50)
    rng = np.random.default_rng(settings.seed + 3000)
    _keep_averages(pipe, train_denoiser(pipe, stage, rng, log, example=lambda rng: patterned_example(rng, SUBJECT_PATTERNS)))


def _keep_averages(pipe, averaged: dict):
    """The EMA weights in place of the trained ones, frozen."""
    for name, model in averaged.items():
        getattr(pipe, name).load_state_dict(model.state_dict())
        getattr(pipe, name).eval().requires_grad_(False)


def pretrain_world_model(settings: PretrainSettings, log=print):
    """The untrained pipeline of `build_mini_sdxl_pipeline(seed)`, trained; EMA weights in the result."""
    rng = np.random.default_rng(settings.seed)
    pipe = build_mini_sdxl_pipeline(settings.seed)
    train_vae(pipe.vae, settings, rng, log)
    log(f"latent scale {set_latent_scale(pipe.vae, rng):.4f}")
    _keep_averages(pipe, train_denoiser(pipe, settings, rng, log))
    learn_patterns(pipe, settings, log)
    finetune_decoder(pipe.vae, settings, log)
    return pipe

