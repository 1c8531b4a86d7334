import importlib.util
import logging

import pytest
import torch

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args

REQUIRED = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0", "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog"]


def test_defaults_and_diffusers_compatible_names():
    args = parse_args(REQUIRED)
    assert args.resolution == 1024 and args.rank == 4 and args.mixer_init == "orthogonal"
    assert args.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert args.bucketing and args.cache_latents is None and args.lr_warmup_steps == 0
    assert args.report_to == "tensorboard" and args.optimizer == "adamw"
    args = parse_args(REQUIRED + ["--target_modules", "to_q, to_v", "--no_bucketing", "--no_cache_latents",
                                  "--mixer_init", "none", "--lora_alpha", "8"])
    assert args.target_modules == ("to_q", "to_v") and not args.bucketing and args.cache_latents is False
    assert args.lora_alpha == 8.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "1001"], "multiple of 8"),
        (["--with_prior_preservation", "--class_data_dir", "c"], "needs --class_prompt"),
        (["--with_prior_preservation", "--class_prompt", "a dog"], "needs --class_data_dir"),
        (["--with_prior_preservation", "--prior_preservation_mode", "base_model"], "needs --class_prompt"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--freeze_mixer", "--mixer_init", "none"], "--freeze_mixer needs a mixer"),
        (["--learning_rate", "-1e-3"], r"^--learning_rate must be a positive number, got -0.001$"),
        (["--learning_rate", "0"], "--learning_rate must be a positive number"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
        (["--text_encoder_lr", "-1"], "--text_encoder_lr must be a positive number"),
        (["--trigger_embedding_lr", "inf"], "--trigger_embedding_lr must be a positive number"),
        (["--lr_warmup_steps", "-10"], "--lr_warmup_steps cannot be negative, got -10"),
    ],
)
def test_impossible_combinations_are_refused(extra, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(REQUIRED + extra)


def test_mixer_choices_are_checked_by_the_parser():
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + ["--mixer_init", "random"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_named():
    with pytest.raises(UserInputError, match="--report_to wandb needs the wandb package"):
        parse_args(REQUIRED + ["--report_to", "wandb"])


def test_the_base_model_prior_needs_no_class_folder():
    args = parse_args(REQUIRED + ["--with_prior_preservation", "--prior_preservation_mode", "base_model",
                                  "--class_prompt", "a photo of a dog"])
    assert args.prior_preservation_mode == "base_model" and args.class_data_dir is None


def test_class_prompts_come_from_a_file_read_before_any_model(tmp_path):
    (tmp_path / "classes.txt").write_text("# class prompts\na photo of a dog\na dog on the beach\n")
    args = parse_args(REQUIRED + ["--with_prior_preservation", "--class_data_dir", "c",
                                  "--class_prompts_file", str(tmp_path / "classes.txt")])
    assert args.class_prompts == ["a photo of a dog", "a dog on the beach"] and args.class_prompt == "a photo of a dog"
    with pytest.raises(UserInputError, match="prompts file not found"):
        parse_args(REQUIRED + ["--class_prompts_file", str(tmp_path / "missing.txt")])


def test_target_modules_the_kohya_export_cannot_name_are_refused_before_training():
    with pytest.raises(UserInputError, match=r"--target_modules time_emb_proj .*kohya.*to_q.*ff\.net\.2") as error:
        parse_args(REQUIRED + ["--target_modules", "to_q,time_emb_proj"])
    assert "\n" not in str(error.value)
    args = parse_args(REQUIRED + ["--target_modules", "to_q,attn2.to_k,proj_in,proj_out,ff.net.0.proj,ff.net.2"])
    assert args.target_modules == ("to_q", "attn2.to_k", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def test_low_memory_chooses_fp16_on_a_card_without_bf16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.INFO, logger="dreambooth_moslora.trainer.arguments"):
        args = parse_args(REQUIRED + ["--low_memory"])
    assert args.mixed_precision == "fp16" and "fp16" in caplog.text and "bf16" in caplog.text
    assert parse_args(REQUIRED + ["--low_memory", "--mixed_precision", "bf16"]).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert parse_args(REQUIRED + ["--low_memory"]).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_args(REQUIRED + ["--low_memory"]).mixed_precision == "bf16"


def test_diffusers_harmless_options_are_accepted(caplog):
    diffusers_only = ["--validation_epochs", "25", "--output_kohya_format", "--local_rank", "0",
                      "--prior_generation_precision", "fp16"]
    with caplog.at_level(logging.WARNING):
        args = parse_args(REQUIRED + ["--use_8bit_adam", "--optimizer", "AdamW"] + diffusers_only)
    assert args.optimizer == "adamw8bit"
    assert "--validation_epochs" in caplog.text and "--validation_steps" in caplog.text
    assert not any(hasattr(args, o.lstrip("-")) for o in diffusers_only + ["--use_8bit_adam"])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert parse_args(REQUIRED + ["--optimizer", "prodigy", "--use_8bit_adam"]).optimizer == "prodigy"
    assert "--use_8bit_adam" in caplog.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push_to_hub"], "hf upload USER/NAME OUTPUT_DIR"),
        (["--hub_model_id", "me/sks-dog"], "hf upload USER/NAME OUTPUT_DIR"),
        (["--hub_token", "x"], "hf upload USER/NAME OUTPUT_DIR"),
        (["--dataset_name", "me/dogs", "--caption_column", "text"], "--instance_data_dir"),
        (["--crops_coords_top_left_h", "0"], "its own crop"),
    ],
)
def test_diffusers_options_without_a_counterpart_say_what_to_use(extra, message):
    with pytest.raises(UserInputError, match=rf"^{extra[0]} .*{message}") as error:
        parse_args(REQUIRED + extra)
    assert "\n" not in str(error.value)
