import math
from collections import Counter

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from conftest import sample, training_argv
from dreambooth_moslora import load_moslora
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.train import TrainingDiverged, train
from helpers import record_training_dtypes, write_images, write_two_subjects

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((96, 64), (64, 96), (80, 80)))
    return tmp_path / "subject"


def run(tiny_sdxl_dir, subject, output_dir, *extra):
    return train(parse_args(training_argv(tiny_sdxl_dir, subject, output_dir, *extra)))


def test_training_moves_the_adapter_and_writes_loadable_files(tiny_sdxl_dir, subject, tmp_path, tiny_pipe):
    result = run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "3")
    assert result.steps == 3 and len(result.losses) == 3 and all(l > 0 for l in result.losses)
    native = load_file(tmp_path / "out" / "moslora.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in native.items())
    base = sample(tiny_pipe)
    load_moslora(tiny_pipe, tmp_path / "out" / "moslora.safetensors")
    assert (sample(tiny_pipe) - base).abs().max() > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "a photo of sks dog" in card and "lora_kohya.safetensors" in card and "orthogonal" in card


def test_cached_and_uncached_training_give_the_same_first_step_loss(tiny_sdxl_dir, subject, tmp_path, fresh_accelerate):
    from accelerate.state import AcceleratorState

    common = ("--max_train_steps", "1", "--center_crop", "--random_flip", "--train_batch_size", "1")
    cached = run(tiny_sdxl_dir, subject, tmp_path / "cached", *common, "--cache_latents")
    AcceleratorState._reset_state(reset_partial_state=True)
    uncached = run(tiny_sdxl_dir, subject, tmp_path / "uncached", *common, "--no_cache_latents", "--no_cache_prompts")
    assert cached.losses[0] == pytest.approx(uncached.losses[0], rel=1e-5, abs=1e-6)


def test_random_crops_refuse_latent_caching(tiny_sdxl_dir, subject, tmp_path):
    with pytest.raises(UserInputError, match="--cache_latents would freeze one random crop"):
        run(tiny_sdxl_dir, subject, tmp_path / "out", "--resolution", "128", "--cache_latents")


def test_per_image_captions_reach_the_text_encoders(tiny_sdxl_dir, subject, tmp_path, monkeypatch):
    (subject / "01.txt").write_text("a photo of sks dog wearing a hat")
    import dreambooth_moslora.trainer.caching as caching

    seen = []
    original = caching.encode_prompts

    def recording(encoders, tokenizers, prompts, device):
        seen.extend(prompts)
        return original(encoders, tokenizers, prompts, device)

    monkeypatch.setattr(caching, "encode_prompts", recording)
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "1")
    assert set(seen) == {"a photo of sks dog", "a photo of sks dog wearing a hat"}


def test_caption_dropout_trains_on_the_empty_prompt_sometimes(tiny_sdxl_dir, subject, tmp_path, monkeypatch):
    import dreambooth_moslora.trainer.train as training

    seen = []
    original = training.TrainingLoop._prompt_embeddings

    def recording(self, captions):
        seen.extend(captions)
        return original(self, captions)

    monkeypatch.setattr(training.TrainingLoop, "_prompt_embeddings", recording)
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "12", "--caption_dropout", "0.5")
    assert set(seen) == {"", "a photo of sks dog"}


def test_buckets_train_at_each_images_aspect_ratio(tiny_sdxl_dir, tmp_path, monkeypatch):
    write_images(tmp_path / "subject", sizes=((256, 128), (128, 256)))
    import dreambooth_moslora.trainer.train as training

    shapes = set()
    original = training.sample_latents

    def recording(mean, std, noise, config):
        shapes.add(tuple(mean.shape[-2:]))
        return original(mean, std, noise, config)

    monkeypatch.setattr(training, "sample_latents", recording)
    run(tiny_sdxl_dir, tmp_path / "subject", tmp_path / "out", "--resolution", "128", "--max_train_steps", "4",
        "--center_crop")
    assert shapes == {(8, 24), (24, 8)}  # 64×192 and 192×64 buckets, latents are 1/8


def test_prior_preservation_generates_missing_class_images_and_trains(tiny_sdxl_dir, subject, tmp_path):
    classes = tmp_path / "classes"
    write_images(classes, sizes=((64, 64),))
    result = run(tiny_sdxl_dir, subject, tmp_path / "out", "--with_prior_preservation", "--class_data_dir",
                 str(classes), "--class_prompt", "a photo of a dog", "--num_class_images", "3",
                 "--num_inference_steps", "2", "--sample_batch_size", "2", "--max_train_steps", "3")
    assert sorted(p.name for p in classes.glob("*.png")) == ["00.png", "class-00000.png", "class-00001.png"]
    assert (classes / "class-00001.txt").read_text().strip() == "a photo of a dog"
    assert result.steps == 3


@pytest.mark.parametrize("text_encoders", [(), ("--train_text_encoder", "--text_encoder_lr", "1e-3")])
def test_the_base_model_prior_targets_the_base_models_own_prediction(tiny_sdxl_dir, tmp_path, text_encoders):
    """One image, batch 2: the batch is the image with its caption and with the class caption. With B = 0 the
    adapted model is the base model, so the class half's loss is exactly 0 and its weight cannot matter."""
    from accelerate.state import AcceleratorState

    write_images(tmp_path / "one", sizes=((64, 64),))
    common = ("--with_prior_preservation", "--prior_preservation_mode", "base_model", "--class_prompt",
              "a photo of a dog", "--train_batch_size", "2", "--max_train_steps", "2", *text_encoders)
    light = run(tiny_sdxl_dir, tmp_path / "one", tmp_path / "light", *common, "--prior_loss_weight", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    heavy = run(tiny_sdxl_dir, tmp_path / "one", tmp_path / "heavy", *common, "--prior_loss_weight", "5")
    assert light.losses[0] == pytest.approx(heavy.losses[0], rel=1e-6) and light.losses[0] > 0
    assert light.losses[1] != heavy.losses[1]  # once B moved, the class half counts
    assert not (tmp_path / "light" / "class").exists()


def test_text_encoder_training_writes_and_reloads_text_encoder_adapters(tiny_sdxl_dir, subject, tmp_path, tiny_pipe):
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--train_text_encoder", "--text_encoder_lr", "1e-3")
    loaded = load_moslora(tiny_pipe, tmp_path / "out" / "moslora.safetensors")
    assert set(loaded) == {"unet", "text_encoder", "text_encoder_2"}
    moved = [l.lora_B.abs().max() > 0 for l in moslora_layers(tiny_pipe.text_encoder_2).values()]
    assert any(moved)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path / "out")
    assert (sample(stock) - sample(tiny_pipe)).abs().max() < 1e-4


def test_resume_continues_exactly(tiny_sdxl_dir, subject, tmp_path, fresh_accelerate):
    from accelerate.state import AcceleratorState

    options = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--lora_dropout", "0.1",
               "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--random_flip", "--gradient_accumulation_steps", "2",
               "--train_batch_size", "1")
    straight = run(tiny_sdxl_dir, subject, tmp_path / "straight", *options)
    AcceleratorState._reset_state(reset_partial_state=True)
    run(tiny_sdxl_dir, subject, tmp_path / "split", *options[:1], "2", *options[2:])
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = run(tiny_sdxl_dir, subject, tmp_path / "split", *options, "--resume_from_checkpoint", "latest")
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)
    a = load_file(tmp_path / "straight" / "moslora.safetensors")
    b = load_file(tmp_path / "split" / "moslora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_checkpoints_are_pruned_to_the_limit(tiny_sdxl_dir, subject, tmp_path):
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "7", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]


def test_nan_loss_stops_without_writing_an_adapter_and_keeps_checkpoints(tiny_sdxl_dir, subject, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf).*checkpoint-1"):
        run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "20", "--learning_rate", "1e30",
            "--checkpointing_steps", "1", "--max_grad_norm", "0")
    out = tmp_path / "out"
    assert not (out / "moslora.safetensors").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-1" / "moslora.safetensors").is_file()


def test_epochs_validation_images_and_the_model_card(tiny_sdxl_dir, subject, tmp_path):
    argv = training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--num_train_epochs", "2",
                         "--validation_prompt", "a photo of sks dog on the moon", "--num_validation_images", "2",
                         "--validation_steps", "3", "--num_inference_steps", "2", steps=None)
    result = train(parse_args(argv))
    assert result.steps == 6  # 3 images, batch 1, two epochs
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["final-step-6", "step-3"]
    assert sorted(p.name for p in (tmp_path / "out" / "validation" / "final-step-6").glob("*.png")) == [
        "000-0.png", "000-1.png", "grid.png"]
    assert "validation/final-step-6/000-0.png" in (tmp_path / "out" / "README.md").read_text()


def test_gradient_checkpointing_gives_the_same_adapter(tiny_sdxl_dir, subject, tmp_path, fresh_accelerate,
                                                       monkeypatch):
    """The same adapters, UNet's and text encoders', with and without checkpointing; and checkpointing did happen
    in both (the UNet's through torch.utils.checkpoint, the text encoders' through the function transformers
    binds when it is enabled)."""
    import transformers.modeling_utils
    from accelerate.state import AcceleratorState

    options = ("--lora_dropout", "0.1", "--train_text_encoder", "--text_encoder_lr", "1e-3")
    plain = run(tiny_sdxl_dir, subject, tmp_path / "plain", *options)
    AcceleratorState._reset_state(reset_partial_state=True)
    calls = {"unet": 0, "text encoders": 0}

    def counting(counter, original):
        def checkpoint(*args, **kwargs):
            calls[counter] += 1
            return original(*args, **kwargs)
        return checkpoint

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting("unet", torch.utils.checkpoint.checkpoint))
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        counting("text encoders", transformers.modeling_utils.checkpoint))
    checkpointed = run(tiny_sdxl_dir, subject, tmp_path / "ckpt", *options, "--gradient_checkpointing")
    assert calls["unet"] > 0 and calls["text encoders"] > 0, calls
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = (load_file(tmp_path / d / "moslora.safetensors") for d in ("plain", "ckpt"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_bf16_frozen_weights_and_an_fp32_adapter(tiny_sdxl_dir, subject, tmp_path,
                                                                              monkeypatch):
    seen = record_training_dtypes(monkeypatch)
    result = run(tiny_sdxl_dir, subject, tmp_path / "out", "--mixed_precision", "bf16", "--snr_gamma", "5",
                 "--noise_offset", "0.05")
    assert all(math.isfinite(l) for l in result.losses)
    # during the steps: the frozen UNet and text encoders in bf16, the adapter in fp32, computing under bf16 autocast
    assert seen["frozen"] == {torch.bfloat16} and seen["frozen_bytes"] == 2 * seen["frozen_numel"]
    assert seen["text_encoders"] == {torch.bfloat16} and seen["unet_input"] == torch.bfloat16
    assert seen["adapter"] == {torch.float32}
    assert seen["autocast"] == torch.bfloat16 and seen["layer_output"] == torch.bfloat16
    native = load_file(tmp_path / "out" / "moslora.safetensors")
    assert {v.dtype for v in native.values()} == {torch.float32}


def test_adamw_takes_the_fused_kernel_for_the_adapter_and_text_encoders(tiny_sdxl_dir, subject, tmp_path, monkeypatch):
    import dreambooth_moslora.trainer.train as training

    build, built = training.build_optimizer, []
    monkeypatch.setattr(training, "build_optimizer", lambda *a: built.append(build(*a)) or built[-1])
    result = run(tiny_sdxl_dir, subject, tmp_path / "out", "--train_text_encoder", "--max_train_steps", "2")
    (optimizer,) = built
    assert optimizer.defaults["fused"] and len(optimizer.param_groups) == 2
    assert all(math.isfinite(l) for l in result.losses)


def test_two_subjects_train_into_one_adapter_each_with_its_trigger(tiny_sdxl_dir, tmp_path, monkeypatch):
    import dreambooth_moslora.trainer.train as training

    seen, original = [], training.TrainingLoop.micro_step

    def recording(self, number, examples, *rest):
        seen.extend(e.caption for e in examples)
        return original(self, number, examples, *rest)

    monkeypatch.setattr(training.TrainingLoop, "micro_step", recording)
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "5", "--train_batch_size", "2", "--dataset_config", str(write_two_subjects(tmp_path)),
            "--resolution", "64", "--learning_rate", "1e-3", "--report_to", "none"]
    result = train(parse_args(argv))
    # one epoch: the dog's 2 photos twice and their 4 prior examples, the cat's photo and one class image: 5 batches
    assert result.steps == 5 and all(math.isfinite(l) for l in result.losses)
    assert Counter(seen) == {"a photo of sks dog": 4, "a photo of dog": 4, "a photo of zwx cat": 1,
                             "a photo of a cat": 1}
    assert "a photo of sks dog; a photo of zwx cat" in (tmp_path / "out" / "README.md").read_text()
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0
               for k, v in load_file(tmp_path / "out" / "moslora.safetensors").items())


def test_the_flags_file_trains_as_the_flags_do_and_its_loss_weight_scales_the_loss(tiny_sdxl_dir, subject, tmp_path,
                                                                                      capsys, fresh_accelerate):
    from accelerate.state import AcceleratorState

    flags = run(tiny_sdxl_dir, subject, tmp_path / "flags", "--max_train_steps", "2", "--repeats", "2").losses
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(training_argv(tiny_sdxl_dir, subject, tmp_path / "x", "--repeats", "2", "--print_dataset_config"))
    printed = capsys.readouterr().out
    losses = {}
    for weight in (1.0, 3.0):
        (tmp_path / f"{weight}.toml").write_text(printed.replace("loss_weight = 1.0", f"loss_weight = {weight}"))
        argv = ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--output_dir", str(tmp_path / str(weight)),
                "--dataset_config", str(tmp_path / f"{weight}.toml"), "--resolution", "64", "--learning_rate", "1e-3",
                "--report_to", "none", "--max_train_steps", "2"]
        losses[weight] = train(parse_args(argv)).losses
        AcceleratorState._reset_state(reset_partial_state=True)
    assert losses[1.0] == flags  # the same run, to the bit
    assert losses[3.0][0] == pytest.approx(3 * flags[0], rel=1e-6)  # step 1; Adam's steps then differ slightly
