import numpy as np
import torch

from dreambooth_moslora.world.model import build_mini_sdxl_pipeline
from dreambooth_moslora.world.pretrain import (
    HELD_OUT_EVERY,
    PretrainSettings,
    PATTERN_WORDS,
    SUBJECT_PATTERNS,
    finetune_decoder,
    held_out_combinations,
    held_out_scenes,
    is_held_out,
    learn_patterns,
    patterned_example,
    patterned_render,
    set_latent_scale,
    train_denoiser,
    train_vae,
    training_scene,
)
from dreambooth_moslora.world.render import COLOURS, SHAPES

TINY = PretrainSettings(vae_steps=2, vae_batch_size=4, steps=2, batch_size=4, warmup_steps=1, decoder_steps=2,
                        pattern_steps=2)


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


def test_patterned_renders_fill_half_the_objects_with_two_colours():
    rng = np.random.default_rng(0)
    palette = np.array(list(COLOURS.values()), dtype=np.int16)
    counts = []
    for _ in range(40):
        pixels = np.asarray(patterned_render(rng), dtype=np.int16).reshape(-1, 1, 3)
        exact = np.abs(pixels - palette[None]).max(-1) <= 2
        counts.append(int((exact.sum(0) > 8).sum()))  # colours covering more than a few pixels
    assert 10 <= sum(c >= 3 for c in counts) <= 30 and min(counts) >= 1


def test_the_decoder_finetune_leaves_the_encoder_and_so_the_latents_alone():
    pipe = build_mini_sdxl_pipeline(seed=0)
    encoder = {k: v.clone() for k, v in pipe.vae.encoder.state_dict().items()}
    decoder_in = pipe.vae.decoder.conv_in.weight.clone()
    finetune_decoder(pipe.vae, TINY, log=lambda _: None)
    assert all(torch.equal(v, encoder[k]) for k, v in pipe.vae.encoder.state_dict().items())
    assert not torch.equal(pipe.vae.decoder.conv_in.weight, decoder_in)
    assert not any(p.requires_grad for p in pipe.vae.parameters())


def test_patterned_examples_name_their_pattern_and_never_show_a_subjects():
    rng = np.random.default_rng(0)
    words = {word: pattern for pattern, word in PATTERN_WORDS.items()}
    patterned = []
    for _ in range(400):
        _, caption = patterned_example(rng, SUBJECT_PATTERNS)
        parts = caption.split()  # a photo of a red [and yellow striped] star on a ...
        if parts[5] == "and":
            patterned.append((words[parts[7]], frozenset((parts[4], parts[6]))))
    assert 150 <= len(patterned) <= 250
    assert not set(patterned) & SUBJECT_PATTERNS
    assert {pattern for pattern, _ in patterned} == set(PATTERN_WORDS)
    assert ("dots", frozenset(("blue", "white"))) in SUBJECT_PATTERNS  # the egg's


def test_learning_patterns_trains_the_unet_and_text_encoders_not_the_vae():
    pipe = build_mini_sdxl_pipeline(seed=0)
    pipe.unet.requires_grad_(False)  # as the first denoiser stage leaves it
    before = {name: next(getattr(pipe, name).parameters()).clone() for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    learn_patterns(pipe, TINY, log=lambda _: None)
    changed = {name: not torch.equal(next(getattr(pipe, name).parameters()), value) for name, value in before.items()}
    assert changed == {"unet": True, "text_encoder": True, "text_encoder_2": True, "vae": False}
    assert not any(p.requires_grad for p in pipe.unet.parameters())
