import numpy as np
import torch

from dreambooth_moslora.world.model import build_mini_sdxl_pipeline
from dreambooth_moslora.world.pretrain import (
    HELD_OUT_EVERY,
    PretrainSettings,
    held_out_combinations,
    held_out_scenes,
    is_held_out,
    set_latent_scale,
    train_denoiser,
    train_vae,
    training_scene,
)
from dreambooth_moslora.world.render import COLOURS, SHAPES

TINY = PretrainSettings(vae_steps=2, vae_batch_size=4, steps=2, batch_size=4, warmup_steps=1)


def test_held_out_combinations_never_appear_in_pretraining():
    combinations = held_out_combinations()
    total = len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    assert abs(len(combinations) / total - 1 / HELD_OUT_EVERY) < 0.03
    assert {c[0] for c in combinations} == set(SHAPES)
    rng = np.random.default_rng(0)
    assert not any(is_held_out(s.shape, s.colour, s.background) for s in (training_scene(rng) for _ in range(500)))
    assert all(is_held_out(s.shape, s.colour, s.background) for s in held_out_scenes(rng, 50))


def test_pretraining_steps_change_every_trained_model_and_set_the_latent_scale():
    pipe = build_mini_sdxl_pipeline(seed=0)
    rng = np.random.default_rng(0)
    vae_before = pipe.vae.encoder.conv_in.weight.clone()
    train_vae(pipe.vae, TINY, rng, log=lambda _: None)
    assert not torch.equal(pipe.vae.encoder.conv_in.weight, vae_before)
    scale = set_latent_scale(pipe.vae, rng, count=16)
    assert pipe.vae.config.scaling_factor == scale > 0
    before = {name: next(getattr(pipe, name).parameters()).clone() for name in ("unet", "text_encoder_2")}
    ema = train_denoiser(pipe, TINY, rng, log=lambda _: None)
    assert set(ema) == {"unet", "text_encoder", "text_encoder_2"}
    for name, weight in before.items():
        assert not torch.equal(next(getattr(pipe, name).parameters()), weight)
    sks = pipe.tokenizer.convert_tokens_to_ids("sks</w>")
    assert torch.equal(ema["text_encoder"].get_input_embeddings().weight[sks],
                       build_mini_sdxl_pipeline(seed=0).text_encoder.get_input_embeddings().weight[sks])
