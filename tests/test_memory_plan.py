import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import training_argv
from dreambooth_moslora.trainer import setup as trainer_setup
from dreambooth_moslora.trainer import train as train_module
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.memory_plan import PlanSettings, model_configs, plan_memory
from dreambooth_moslora.trainer.meta_memory import LiveTensorBytes
from helpers import write_images, write_two_subjects

MINI_SDXL = Path(__file__).resolve().parents[1] / "assets" / "mini-sdxl"


def _bytes(tensors) -> int:
    unique = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def measured_training_step(monkeypatch, argv) -> dict:
    """Run the real trainer and count its second step as the plan counts: the tensors alive before it (weights,
    adapter, optimizer state, caches) plus its inputs and the most bytes its own ops keep alive at once."""
    measured = {}
    original = train_module.TrainingLoop.micro_step

    def counted(self, number, *rest):
        if number != 1:
            return original(self, number, *rest)
        models = [*self.trained.values(), self.models.vae, *self.models.text_encoders]
        resident = [t for m in models for t in (*m.parameters(), *m.buffers())]
        resident += [t for state in self.optimizer.optimizer.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0]
        for cache in (self.latent_cache, self.prompt_cache):
            resident += [t for entry in (cache or {}).values() for t in entry]
        resident += list(self.ema.shadow.values()) if self.ema is not None else []
        inputs = [t for t in rest if isinstance(t, torch.Tensor)]  # the photos' pixels, when encoded in the step
        counter = LiveTensorBytes()
        with counter:
            loss = original(self, number, *rest)
        measured.update(resident=_bytes(resident), step=counter.peak + (_bytes(inputs) if inputs else 0))
        return loss

    monkeypatch.setattr(train_module.TrainingLoop, "micro_step", counted)
    train_module.train(parse_args(argv))
    return measured


@pytest.mark.parametrize("base, resolution, photo, extra", [
    ("tiny", 64, (64, 64), ("--gradient_checkpointing", "--train_batch_size", "2")),
    ("tiny", 64, (96, 64), ("--gradient_checkpointing", "--train_batch_size", "2")),  # random crops: encoded
    ("tiny", 64, (64, 64), ("--train_text_encoder", "--rank", "8")),                    # in the step, one by one
    ("tiny", 64, (64, 64), ("--lora_dropout", "0.1", "--use_ema", "--no_cache_prompts")),
    ("mini", 32, (32, 32), ("--rank", "16")),
    ("mini", 32, (32, 32), ("--train_trigger_embedding", "sks")),
])
def test_the_plan_is_within_ten_percent_of_a_real_step(tiny_sdxl_dir, tmp_path, monkeypatch, fresh_accelerate,
                                                       base, resolution, photo, extra):
    """The plan's settings come from the same options and photos (plan_settings), as the trainer's decisions do."""
    from dreambooth_moslora.trainer.data import read_examples
    from dreambooth_moslora.trainer.memory_plan import plan_settings

    folder = tiny_sdxl_dir if base == "tiny" else MINI_SDXL
    instance = tmp_path / "instance"
    write_images(instance, sizes=(photo,) * 4)
    argv = training_argv(folder, instance, tmp_path / "out", "--resolution", str(resolution), *extra, steps=2)
    measured = measured_training_step(monkeypatch, argv)
    args = parse_args(argv)
    settings = plan_settings(args, read_examples(instance, args.instance_prompt, resolution, args.bucketing))
    plan = plan_memory(model_configs(str(folder)), replace(settings, offload_frozen=False))  # the CPU keeps all
    total = measured["resident"] + measured["step"]
    assert abs(plan.total - total) / total < 0.10, (plan.total, total)
    assert abs(plan.step_peak - measured["step"]) / measured["step"] < 0.15, (plan.step_peak, measured["step"])


def test_the_plan_verb_breaks_the_peak_down_and_marks_the_presets(tiny_sdxl_dir, capsys):
    from dreambooth_moslora.verbs.cli import main

    assert main(["plan", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    for line in ("UNet weights", "optimizer state (adamw)", "activations and gradients", "total",
                 "cached prompts (20 images)",  # no photos given: random crops assumed, latents encoded each step
                 "text encoders kept off the accelerator once cached", "| bf16 + gradient checkpointing |"):
        assert line in out, line
    assert out.count("| ✓ | ✓ | ✓ | ✓ |") == 5  # the tiny model fits everywhere


def test_the_plan_verb_reads_a_dataset_files_photos(tiny_sdxl_dir, tmp_path, capsys):
    from dreambooth_moslora.verbs.cli import main

    assert main(["plan", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--resolution", "64",
                 "--dataset_config", str(write_two_subjects(tmp_path)), "--center_crop"]) == 0
    # the dog's two photos, the cat's one, the dog's two base-model prior examples and the shared cats folder's one
    assert "cached prompts (6 images)" in capsys.readouterr().out
    from dreambooth_moslora.trainer.memory_plan import plan_settings

    args = parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config",
                       str(tmp_path / "dataset.toml")])
    assert plan_settings(args).base_model_prior  # the dog's prior: a second UNet pass in the planned step


def test_checkpointing_and_caching_change_the_plan_as_they_change_a_step(tiny_sdxl_dir):
    configs = model_configs(str(tiny_sdxl_dir))
    plain = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no"))
    assert plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no",
                                             gradient_checkpointing=True)).step_peak < plain.step_peak
    uncached = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no", cache_latents=False))
    assert "VAE" in uncached.weights and "VAE" in plain.offloaded


def test_sdxl_configs_are_used_for_a_hub_id_and_count_sdxl_parameters():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    configs = model_configs("stabilityai/stable-diffusion-xl-base-1.0")  # offline: SDXL base 1.0's architecture
    with torch.device("meta"):
        models = (UNet2DConditionModel.from_config(configs.unet), CLIPTextModel(configs.text_encoders[0]),
                  CLIPTextModelWithProjection(configs.text_encoders[1]), AutoencoderKL.from_config(configs.vae))
    # SDXL base 1.0's published sizes: UNet 2.567 B, CLIP ViT-L 123 M, OpenCLIP ViT-bigG 695 M, VAE 84 M
    assert [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in models] == [2567, 123, 695, 84]


def test_low_memory_turns_on_what_fits_the_least_memory():
    import importlib.util

    from dreambooth_moslora.trainer.arguments import parse_args

    required = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0",
                "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog"]
    args = parse_args(required + ["--low_memory"])
    assert args.gradient_checkpointing and args.mixed_precision == "bf16" and args.base_weights_dtype == "fp8"
    assert args.sample_batch_size == 1  # validation images one at a time
    assert args.optimizer == ("adamw8bit" if importlib.util.find_spec("bitsandbytes") else "adamw")
    assert parse_args(required + ["--low_memory", "--mixed_precision", "fp16"]).mixed_precision == "fp16"


def test_cached_outputs_let_their_models_leave_the_accelerator(tiny_sdxl_dir):
    """"cuda" on a machine without one: the models are on the CPU already, so each move is one that CUDA would
    make, and the selection and the return are the accelerator's path, not the CPU's no-op."""
    from dreambooth_moslora.pipeline.models import load_base_models, models_to_offload, offload_cached_models

    models = load_base_models(str(tiny_sdxl_dir))
    assert models_to_offload(models, prompts_cached=True, latents_cached=True) == [*models.text_encoders, models.vae]
    assert models_to_offload(models, prompts_cached=False, latents_cached=True) == [models.vae]
    assert offload_cached_models(models, "cpu", True, True) == []  # on the CPU there is nothing to free
    moved = []
    for model in (models.unet, *models.text_encoders, models.vae):
        model.to = lambda device, model=model: moved.append((model, device))
    assert offload_cached_models(models, "cuda", prompts_cached=True, latents_cached=False) == [*models.text_encoders]
    assert moved == [(encoder, "cpu") for encoder in models.text_encoders]  # the UNet and the VAE stay


def test_training_on_an_accelerator_logs_the_plan_first(tiny_sdxl_dir, caplog):
    import logging
    from types import SimpleNamespace

    from dreambooth_moslora.pipeline.models import load_base_models

    args = parse_args(training_argv(tiny_sdxl_dir, "photos", "out"))
    models = load_base_models(str(tiny_sdxl_dir))
    on = SimpleNamespace(is_main_process=True, device=torch.device("meta"), mixed_precision="no")
    with caplog.at_level(logging.INFO, logger="dreambooth_moslora"):
        trainer_setup.report_memory_plan(args, SimpleNamespace(**{**vars(on), "device": torch.device("cpu")}), models, [])
        assert not caplog.records  # no card to fit on the CPU
        trainer_setup.report_memory_plan(args, on, models, [])
    assert [r.getMessage()[:30] for r in caplog.records] == ["predicted peak training memory"]


def test_the_vae_and_sampling_figures_are_those_of_the_real_models(tiny_sdxl_dir):
    """Encode, decode (whole and in the trainer's fallback tiles) and a guided UNet step, counted on the real tiny
    models on the CPU, against the plan's meta-device figures: wrong shapes, dtypes or a tiling that never applied
    would not match."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreambooth_moslora.pipeline.vae_tiling import half_size_tiles
    from dreambooth_moslora.trainer.conditioning import encode_latent_distribution

    resolution = 128
    outside = plan_memory(model_configs(str(tiny_sdxl_dir)),
                          PlanSettings(resolution=resolution, mixed_precision="no", sample_batch_size=1)).outside_step
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    image = torch.zeros(1, 3, resolution, resolution)
    latent = torch.zeros(1, vae.config.latent_channels, *encode_latent_distribution(vae, image)[0].shape[-2:])
    width = unet.config.cross_attention_dim

    def counted(run, tiles_of=None, latent_input=False) -> int:
        counter = LiveTensorBytes()
        with torch.no_grad(), counter, (half_size_tiles(vae, tiles_of, latent_input) if tiles_of is not None
                                        else contextlib.nullcontext()):
            run()
        return counter.peak

    real = {
        "whole_encode": counted(lambda: encode_latent_distribution(vae, image)),
        "tiled_encode": counted(lambda: encode_latent_distribution(vae, image), image),
        "whole_decode": counted(lambda: vae.decode(latent)),
        "tiled_decode": counted(lambda: vae.decode(latent), latent, latent_input=True),
        "unet_sampling": counted(lambda: unet(
            torch.zeros(2, *latent.shape[1:]), torch.zeros(2), encoder_hidden_states=torch.zeros(2, 77, width),
            added_cond_kwargs={"text_embeds": torch.zeros(2, unet.config.projection_class_embeddings_input_dim
                                                          - 6 * unet.config.addition_time_embed_dim),
                               "time_ids": torch.zeros(2, 6)})),
    }
    assert real["tiled_encode"] < real["whole_encode"] and real["tiled_decode"] < real["whole_decode"]
    for name, size in real.items():
        assert abs(getattr(outside, name) - size) / size < 0.15, (name, getattr(outside, name), size)


def test_the_plan_samples_in_the_largest_batch_the_trainer_samples_in(tiny_sdxl_dir, tmp_path, monkeypatch,
                                                                      fresh_accelerate):
    """Class images and validation both sample --sample_batch_size images at once, whatever
    --num_validation_images is; the plan's guided sampling step is that batch twice."""
    from dreambooth_moslora.trainer.data import read_examples
    from dreambooth_moslora.trainer.memory_plan import plan_settings

    batches = []
    load = trainer_setup.load_base_models

    def load_and_watch_the_unet(*args, **kwargs):
        models = load(*args, **kwargs)
        models.unet.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0]))
        return models

    monkeypatch.setattr(trainer_setup, "load_base_models", load_and_watch_the_unet)
    instance = tmp_path / "instance"
    write_images(instance, sizes=((64, 64),) * 2)
    argv = training_argv(tiny_sdxl_dir, instance, tmp_path / "out", "--with_prior_preservation",
                         "--class_prompt", "a photo of a dog", "--class_data_dir", str(tmp_path / "class"),
                         "--num_class_images", "3", "--sample_batch_size", "3", "--num_validation_images", "1",
                         "--validation_prompt", "a photo of sks dog", "--num_inference_steps", "2", steps=1)
    train_module.train(parse_args(argv))
    args = parse_args(argv)
    settings = plan_settings(args, read_examples(instance, args.instance_prompt, 64, args.bucketing))
    assert settings.samples and max(batches) == 2 * settings.sample_batch_size == 6
    unsampled = plan_settings(parse_args(training_argv(tiny_sdxl_dir, instance, tmp_path / "other")))
    assert not unsampled.samples  # no validation prompt, no class images: nothing is decoded after setup


def test_setup_and_validation_count_the_vae_and_a_card_fits_what_the_tile_fallback_needs():
    from dreambooth_moslora.trainer.memory_plan import GIB, MemoryPlan, OutsideStepActivations

    outside = OutsideStepActivations(whole_encode=3 * GIB, tiled_encode=GIB, whole_decode=4 * GIB,
                                     tiled_decode=GIB // 2, unet_sampling=GIB)
    plan = MemoryPlan(PlanSettings(), weights={"UNet": 4 * GIB}, offloaded={"VAE": GIB}, optimizer_state=GIB,
                      step_peak=2 * GIB, outside_step=outside)
    assert plan.setup() == 8 * GIB and plan.setup(tiled=True) == 6 * GIB  # photos encoded to cache them
    assert plan.validation() == 10 * GIB and plan.validation(tiled=True) == 7 * GIB  # the UNet step beats a tile
    assert (plan.peak, plan.least) == (10 * GIB, 7 * GIB)
    assert plan.fits(8) and not plan.fits(7.5)  # 7 GiB with the VAE in tiles, plus the CUDA context
    uncached = replace(plan, settings=PlanSettings(cache_latents=False))
    assert uncached.setup() == 5 * GIB  # the step encodes each photo, and the step counts it


def test_the_trainer_warns_only_when_a_card_cannot_hold_even_the_tiled_run(tiny_sdxl_dir, caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    from dreambooth_moslora.pipeline.models import load_base_models
    from dreambooth_moslora.trainer.memory_plan import CUDA_RESERVE, plan_settings

    args = parse_args(training_argv(tiny_sdxl_dir, "photos", "out", "--resolution", "128",
                                    "--validation_prompt", "a photo of sks dog"))
    models = load_base_models(str(tiny_sdxl_dir))
    plan = plan_memory(model_configs(str(tiny_sdxl_dir)), plan_settings(args, [], 0, "no"))
    assert plan.least < plan.peak
    cuda = SimpleNamespace(is_main_process=True, device=torch.device("cuda"), mixed_precision="no")
    warnings = []
    for card in (plan.peak + CUDA_RESERVE, plan.least + CUDA_RESERVE, plan.least + CUDA_RESERVE - 1):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, card=card: SimpleNamespace(total_memory=card, name="small card"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
            trainer_setup.report_memory_plan(args, cuda, models, [])
        warnings.append(any("small card" in r.getMessage() for r in caplog.records))
    assert warnings == [False, False, True]


def test_a_learned_trigger_keeps_the_text_encoders_on_the_card_and_counts_its_vectors():
    configs = model_configs(str(MINI_SDXL))
    frozen, learned = (plan_memory(configs, PlanSettings(resolution=32, learned_trigger=t)) for t in (False, True))
    assert "text encoders" in frozen.offloaded and "text encoders" in learned.weights  # prompts not cached
    width = sum(c.hidden_size for c in configs.text_encoders)
    assert learned.adapter - frozen.adapter == width * 4  # one fp32 vector per text encoder
    assert learned.step_peak > frozen.step_peak  # the text encoders' activations, kept for the backward


REQUIRED = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0",
            "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog", "--mixed_precision", "bf16"]


def test_each_presets_options_give_the_presets_settings():
    """The benchmark runs the presets by their options: they must be the settings the table plans."""
    import importlib.util

    from dreambooth_moslora.trainer.memory_plan import PRESET_OPTIONS, plan_settings, presets

    planned = presets(plan_settings(parse_args(REQUIRED)))
    assert PRESET_OPTIONS.keys() == planned.keys()
    for name, options in PRESET_OPTIONS.items():
        settings = plan_settings(parse_args(REQUIRED + options))
        if name.startswith("--low_memory") and importlib.util.find_spec("bitsandbytes") is None:
            settings = replace(settings, optimizer="adamw8bit")  # --low_memory takes 8-bit AdamW where it can
        assert settings == planned[name], name


def test_the_plan_takes_the_trainers_decisions_from_its_options_and_photos(tiny_sdxl_dir, tmp_path):
    from dreambooth_moslora.trainer.data import read_examples
    from dreambooth_moslora.trainer.memory_plan import plan_settings

    configs = model_configs(str(tiny_sdxl_dir))
    photos = tmp_path / "photos"
    write_images(photos, sizes=((96, 64), (64, 96)))  # larger than their buckets: random crops
    args = parse_args(training_argv(tiny_sdxl_dir, photos, tmp_path / "out", "--mixed_precision", "no"))
    examples = read_examples(photos, args.instance_prompt, args.resolution, args.bucketing)
    random_crops = plan_settings(args, examples)
    assert not random_crops.cache_latents and "VAE" in plan_memory(configs, random_crops).weights
    centred = plan_settings(parse_args(training_argv(tiny_sdxl_dir, photos, tmp_path / "out", "--center_crop")),
                            examples)
    assert centred.cache_latents and "VAE" in plan_memory(configs, centred).offloaded
    uncached = plan_settings(parse_args(training_argv(tiny_sdxl_dir, photos, tmp_path / "out", "--center_crop",
                                                      "--no_cache_prompts")), examples)
    assert "text encoders" in plan_memory(configs, uncached).weights  # the trainer keeps them to encode each step


def test_the_moving_average_dropout_and_the_base_model_prior_are_counted(tiny_sdxl_dir, tmp_path):
    configs = model_configs(str(tiny_sdxl_dir))
    plain = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no"))
    averaged = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no", ema_on_accelerator=True))
    assert plain.ema == 0 and averaged.ema == plain.adapter  # an fp32 copy of the fp32 adapter
    assert averaged.total - plain.total == plain.adapter
    dropout = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no", lora_dropout=0.1))
    assert dropout.step_peak > plain.step_peak  # dropout's masks, kept for the backward
    prior = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="no", base_model_prior=True))
    assert prior.step_peak > plain.step_peak  # the base model's own pass beside the kept activations


def test_cached_latents_take_none_of_the_accelerators_memory(tiny_sdxl_dir):
    """The trainer keeps them on the CPU (caching.py); the plan once counted them on the card."""
    from dataclasses import replace

    from dreambooth_moslora.trainer.memory_plan import PlanSettings, model_configs, plan_memory

    configs = model_configs(str(tiny_sdxl_dir))
    settings = PlanSettings(resolution=64, cache_latents=True, cached_images=1000)
    cached, encoded = plan_memory(configs, settings), plan_memory(configs, replace(settings, cache_latents=False))
    assert cached.caches == encoded.caches > 0  # the prompts' embeddings only
