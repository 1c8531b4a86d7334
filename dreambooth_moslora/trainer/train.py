"""DreamBooth training of SDXL with MoSLoRA over accelerate (one GPU, several, or several nodes).

The loop reads top to bottom: latents, noise, timesteps, UNet, loss, backward. Everything random in a step is
drawn from (seed, micro-batch number, process), so a checkpoint resumed with the same processes, batch size and
accumulation continues as the uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from ..adapter.adapters import recorded_base_sha256
from ..adapter.config import TEXT_ENCODER_TARGETS, MoSLoRAConfig
from ..adapter.errors import UserInputError
from ..adapter.feedback import progress_bar
from ..adapter.files import check_writable_folder, write_text_atomically
from ..adapter.inject import inject_moslora, moslora_config, moslora_disabled, moslora_parameters
from ..adapter.io import (DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, TRIGGER_FILE, export_diffusers, export_kohya,
                          export_trigger_embedding, save_moslora)
from ..adapter.trigger import install_trigger_embedding, trigger_parameters, trigger_token
from ..pipeline.generate import GenerationSettings, generate_images
from ..pipeline.models import (back_on, decoding_outside_autocast, enable_text_encoder_checkpointing, load_base_models,
                               model_reference, native_resolution, offload_cached_models, place_models, sdxl_pipeline)
from ..pipeline.single_file import base_model_sha256, check_same_base
from .arguments import DEFAULT_MAX_TRAIN_STEPS
from .caching import cache_latent_distributions, cache_prompt_embeddings
from .checkpoint import (checkpoint_state, last_good_checkpoint, load_checkpoint, prune_checkpoints,
                         resolve_checkpoint, save_checkpoint, weights_are_finite)
from .conditioning import encode_latent_distribution, encode_prompts, micro_conditioning, sample_latents
from .concepts import read_concepts
from .data import MicroBatches, Sample, epoch_batches, keep_as_is, process_micro_batches
from .ema import AdapterEMA, adapter_parameters, averaged_weights
from .fp8 import store_frozen_weights_in_fp8
from .interrupt import StopOnInterrupt, ignore_interrupts
from .masks import render_mask
from .measured_validation import MeasuredValidation, grouped_by_prompt, load_feature_models
from .memory_plan import CUDA_RESERVE, GIB, configs_of, plan_memory, plan_settings, planned_class_examples
from .model_card import model_card
from .output_lock import output_folder_lock
from .prior import generate_class_images, missing_class_indices
from .step import LossSettings, StepInputs, denoising_loss

logger = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PLAN_CHUNK = 64  # micro-batches handed to one DataLoader (its workers restart between chunks)


DIVERGENCE_ADVICE = "Lower --learning_rate, or use --mixed_precision bf16 instead of fp16."


class TrainingDiverged(UserInputError):
    """The loss or the weights stopped being finite; nothing is written for the run, checkpoints are kept."""


@dataclass
class TrainingResult:
    output_dir: Path
    steps: int
    seconds: float
    files: list[Path]
    losses: list[float]
    """Mean loss of each optimizer step this run took (across processes)."""


def step_seed(seed: int, micro_batch: int, process_index: int) -> int:
    return (seed * 1_000_003 + micro_batch) * 8191 + process_index


def train(args) -> TrainingResult:
    """Everything that can be checked without a model is checked first; then the output folder is held."""
    output_dir = Path(args.output_dir)
    check_writable_folder(output_dir, "--output_dir")
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)],
        cpu=not torch.accelerator.is_available(),  # so torchrun on CPUs gives gloo processes, not lone ones
    )
    data = read_concepts(args.dataset, args.resolution, args.bucketing)
    plan_settings(args, data.instance_examples)  # refuses --cache_latents with random crops before any model loads
    feature_models = load_feature_models(args) if accelerator.is_main_process else None
    with output_folder_lock(output_dir, enabled=accelerator.is_main_process):
        return _train(args, accelerator, output_dir, data, feature_models)


def _train(args, accelerator, output_dir: Path, data, feature_models=None) -> TrainingResult:
    _check_resume_base(args, output_dir)
    weight_dtype = training_dtype(accelerator.mixed_precision)
    models, adapted = setup_models(args, accelerator, data.instance_examples)
    training_set = data.training_set(lambda concept: _generate_class_images(args, accelerator, models, concept))
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = _build_optimizer(args, adapted, accelerator.num_processes)
    micro_batches_per_epoch = _micro_batches_per_epoch(args, training_set, accelerator.num_processes)
    max_steps = args.max_train_steps or (
        args.num_train_epochs * math.ceil(micro_batches_per_epoch / args.gradient_accumulation_steps)
        if args.num_train_epochs else DEFAULT_MAX_TRAIN_STEPS
    )
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    prepared = accelerator.prepare(*adapted.values(), optimizer)
    trained, optimizer = dict(zip(adapted, prepared[:-1])), prepared[-1]
    ema = AdapterEMA(adapter_parameters(adapted), args.ema_decay,
                     "cpu" if args.ema_device == "cpu" else accelerator.device) if args.use_ema else None

    global_step = _resume(args, output_dir, adapted, optimizer, lr_scheduler, ema, accelerator.scaler, max_steps)
    settings = plan_settings(args, training_set.examples(), mixed_precision=accelerator.mixed_precision)
    caches = _build_caches(args, accelerator, models, training_set.examples(), settings, samples=(max_steps - global_step)
                           * args.train_batch_size * args.gradient_accumulation_steps)
    offloaded = offload_cached_models(models, accelerator.device, settings.prompts_cached, settings.cache_latents)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-moslora", config=_tracker_config(args))

    measured = MeasuredValidation(args, feature_models, global_step) if feature_models else None
    loop = TrainingLoop(args, accelerator, models, trained, optimizer, lr_scheduler, caches, weight_dtype, ema,
                        offloaded, measured, write_adapter=lambda folder: _adapter_files(args, folder, adapted))
    if measured and not measured.has_baseline:
        loop.validate(0)  # the base model's own measures, which every later step is held against
    start = time.perf_counter()
    first_step = global_step
    with StopOnInterrupt() as stop:
        global_step = loop.run(training_set, global_step, max_steps, stop, save=lambda step: _checkpoint(
            args, output_dir, step, accelerator, adapted, optimizer, lr_scheduler, ema, max_steps))
    seconds = time.perf_counter() - start
    if stop.requested:
        path = _checkpoint(args, output_dir, global_step, accelerator, adapted, optimizer, lr_scheduler, ema,
                           max_steps)
        raise KeyboardInterrupt(f"interrupted at step {global_step}; saved {path}; "
                                "continue with --resume_from_checkpoint latest")

    if stop.stopped_early and global_step % args.checkpointing_steps:  # else its checkpoint is saved already
        _checkpoint(args, output_dir, global_step, accelerator, adapted, optimizer, lr_scheduler, ema, max_steps)
    files = []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with averaged_weights(ema):  # the exported adapter is the average, as validation shows it
            images = loop.validate(global_step, final=True) if args.validation_prompt else []
            files = _write_outputs(args, output_dir, adapted, global_step, images, measured)
        if stop.stopped_early:
            logger.info("stopped early at step %d: the chosen step, %s, has not changed for %d validations",
                        global_step, measured.choice.step, args.early_stopping_patience)
        _summary(global_step - first_step, seconds, files, accelerator.device)
    accelerator.end_training()
    return TrainingResult(output_dir, global_step, seconds, files, loop.losses)


def training_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen weights' dtype; the adapter stays fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def setup_models(args, accelerator, instance) -> tuple:
    """The base models read on the CPU in the training dtype, the plan checked against the card, the adapters
    injected and fp8 applied there too, and only then each model moved to the accelerator, once: the card never
    holds more than the run's own frozen weights. Returns the models and the adapted ones by component."""
    models = load_base_models(args.pretrained_model_name_or_path, args.revision, args.variant,
                              args.pretrained_vae_model_name_or_path, args.model_config,
                              dtype=training_dtype(accelerator.mixed_precision))
    _warn_about_resolution(args.resolution, models, args.pretrained_model_name_or_path)
    _report_memory_plan(args, accelerator, models, instance)
    set_seed(args.seed)  # the adapter's initial A and mixer, drawn on the CPU whatever the accelerator
    adapted = _inject_adapters(args, models)
    place_models(models, accelerator.device)
    return models, adapted


class TrainingLoop:
    """One optimizer step after another, with checkpoints, validation and logging in between."""

    def __init__(self, args, accelerator, models, trained, optimizer, lr_scheduler, caches, weight_dtype, ema=None,
                 offloaded=(), measured=None, write_adapter=None):
        self.args, self.accelerator, self.models, self.ema = args, accelerator, models, ema
        self.measured, self.write_adapter = measured, write_adapter
        self.offloaded = list(offloaded)
        self.trained, self.optimizer, self.lr_scheduler = trained, optimizer, lr_scheduler
        self.latent_cache, self.prompt_cache = caches
        self.weight_dtype = weight_dtype
        self.loss_settings = LossSettings(args.snr_gamma, args.unmasked_weight, args.dataset.base_model_prior)
        self.num_timesteps = len(models.noise_scheduler.alphas_cumprod)
        self.losses: list[float] = []
        self.adapter_parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def run(self, training_set, global_step: int, max_steps: int, stop, save) -> int:
        args, accelerator = self.args, self.accelerator
        for model in self.trained.values():
            model.train()
        progress = progress_bar(total=max_steps, initial=global_step, desc="steps", show=accelerator.is_local_main_process)
        skip = global_step * args.gradient_accumulation_steps
        stream = process_micro_batches(training_set, args.train_batch_size, args.seed, accelerator.num_processes,
                                       accelerator.process_index)
        masked = any(e.mask is not None for e in training_set.examples())
        step_start, micro_losses = time.perf_counter(), []
        while global_step < max_steps and not (stop.requested or stop.stopped_early):
            plan = [item for _, item in zip(range(PLAN_CHUNK), stream) if item[0] >= skip]
            loader = DataLoader(
                MicroBatches(plan, args.seed, accelerator.process_index, args.random_flip, args.center_crop,
                             render_pixels=self.latent_cache is None, caption_dropout=args.caption_dropout,
                             render_mask=render_mask if masked else None),
                batch_size=None, num_workers=args.dataloader_num_workers, collate_fn=keep_as_is,
                worker_init_fn=ignore_interrupts,
            )
            for number, examples, samples, pixels, masks in loader:
                micro_losses.append(self.micro_step(number, examples, samples, pixels, masks))
                if not accelerator.sync_gradients:
                    continue
                loss = sum(micro_losses) / len(micro_losses)
                micro_losses.clear()
                global_step += 1
                if self.ema is not None:
                    self.ema.update(global_step)
                self.losses.append(loss)
                seconds = time.perf_counter() - step_start
                step_start = time.perf_counter()
                lr = self.lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
                accelerator.log({"loss": loss, "lr": lr}, step=global_step)
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    save(global_step)  # the last one too, so a finished run can be extended
                if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0 \
                        and global_step < max_steps and accelerator.is_main_process:
                    with averaged_weights(self.ema):
                        self.validate(global_step)
                    stop.stop_early = bool(self.measured and self.measured.should_stop())
                if global_step >= max_steps or stop.should_stop(accelerator):  # every process at the same step
                    break
        progress.close()
        return global_step

    def micro_step(self, number: int, examples, samples: list[Sample], pixels, masks=None) -> float:
        """One forward and backward; steps the optimizer when accumulation is complete. Returns the mean loss."""
        accelerator, unet = self.accelerator, self.trained["unet"]
        device = accelerator.device
        seed = step_seed(self.args.seed, number, accelerator.process_index)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # adapter dropout
        with accelerator.accumulate(*self.trained.values()):
            mean, std = self._latent_distribution(examples, samples, pixels)
            latents = sample_latents(mean, std, torch.randn(mean.shape, generator=generator).to(device),
                                     self.models.vae.config)
            noise = torch.randn(latents.shape, generator=generator)
            if self.args.noise_offset:
                noise += self.args.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
            noise = noise.to(device)
            timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator).to(device)
            captions = [s.caption(e) for e, s in zip(examples, samples)]
            prompt_embeds, pooled = self._prompt_embeddings(captions)
            time_ids = torch.tensor(
                [micro_conditioning(e.original_size, s.crop_top_left, e.target_size) for e, s in zip(examples, samples)],
                device=device,
            )
            inputs = StepInputs(latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                                [e.base_model_target for e in examples], masks, [e.loss_weight for e in examples])
            loss = denoising_loss(unet, self.models.noise_scheduler, inputs, self.loss_settings, self.weight_dtype,
                                  base_unet=accelerator.unwrap_model(unet),
                                  base_prompt=self._base_prompt(captions) if len(self.trained) > 1 else None)
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(self._divergence_message(mean_loss))
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.args.max_grad_norm:
                accelerator.clip_grad_norm_(self.adapter_parameters, self.args.max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def _base_prompt(self, captions):
        """The base model's prompt embeddings, text-encoder adapters off, for the base-model prior."""

        @torch.no_grad()
        def encode():
            # unwrapped: a DDP forward broadcasts buffers, and processes whose micro-batch has no class example
            # skip this call, so the wrapped one would wait for them forever
            encoders = self._text_encoders(unwrapped=True)
            with moslora_disabled(encoders[0]), moslora_disabled(encoders[1]):
                return encode_prompts(encoders, self.models.tokenizers, captions, self.accelerator.device)

        return encode

    def _latent_distribution(self, examples, samples, pixels):
        if self.latent_cache is not None:
            pairs = [self.latent_cache[(e, s.flip)] for e, s in zip(examples, samples)]
            return torch.stack([m for m, _ in pairs]).to(self.accelerator.device), torch.stack([s for _, s in pairs]).to(self.accelerator.device)
        return encode_latent_distribution(self.models.vae, pixels)

    def _prompt_embeddings(self, captions):
        if self.prompt_cache is not None:
            embeds = [self.prompt_cache[c] for c in captions]
            return torch.stack([e for e, _ in embeds]), torch.stack([p for _, p in embeds])
        return encode_prompts(self._text_encoders(), self.models.tokenizers, captions, self.accelerator.device)

    def _text_encoders(self, unwrapped: bool = False) -> list:
        """The text encoders as trained: the prepared (wrapped) ones where they are trained, else the frozen ones."""
        encoders = [self.trained.get(name, encoder) for name, encoder in zip(TEXT_ENCODERS, self.models.text_encoders)]
        return [self.accelerator.unwrap_model(e) for e in encoders] if unwrapped else encoders

    def _divergence_message(self, loss) -> str:
        return (f"the loss became {loss} ; training stopped and no adapter was written; "
                f"{last_good_checkpoint(self.args.output_dir)}. {DIVERGENCE_ADVICE}")

    @torch.no_grad()
    def validate(self, step: int, final: bool = False) -> list[Path]:
        """Sample the validation prompt with the adapter as it is now; PNGs under validation/, and the tracker."""
        args, accelerator = self.args, self.accelerator
        unwrap = accelerator.unwrap_model
        pipe = sdxl_pipeline(self.models, unwrap(self.trained["unet"]), self._text_encoders(unwrapped=True))
        for model in self.trained.values():
            model.eval()
        folder = Path(args.output_dir) / "validation" / (f"final-step-{step}" if final else f"step-{step}")
        prompts = [p.prompt for p in self.measured.prompts] if self.measured else [args.validation_prompt]
        settings = GenerationSettings(num_images_per_prompt=args.num_validation_images, seed=args.seed,
                                      batch_size=args.sample_batch_size,
                                      num_inference_steps=args.num_inference_steps, height=args.resolution,
                                      width=args.resolution)
        with accelerator.autocast(), decoding_outside_autocast(self.models.vae), \
                back_on(self.offloaded, accelerator.device):
            paths = generate_images(pipe, prompts, settings, folder, adapter_name="training", show_progress=False)
        for model in self.trained.values():
            model.train()
        _log_images(accelerator, paths, step)
        record = self.measured and self.measured.record(
            step, grouped_by_prompt(paths, self.measured.prompts, args.num_validation_images), self.write_adapter)
        if record:
            accelerator.log({f"validation/{name}": value for name, value in record.items() if name != "step"},
                            step=step)
        return paths


def _log_images(accelerator, paths, step):
    if accelerator.trackers and any(t.name == "tensorboard" for t in accelerator.trackers):
        import numpy as np
        from PIL import Image

        images = np.stack([np.asarray(Image.open(p)) for p in paths])
        accelerator.get_tracker("tensorboard").writer.add_images("validation", images, step, dataformats="NHWC")


def _report_memory_plan(args, accelerator, models, examples):
    """Before any model reaches the device: the plan's one line on an accelerator, and a warning when its peak
    exceeds the card (on the CPU there is no card to fit, and planning costs seconds)."""
    if not accelerator.is_main_process or accelerator.device.type == "cpu":
        return
    settings = plan_settings(args, examples, planned_class_examples(args, len(examples)), accelerator.mixed_precision)
    plan = plan_memory(configs_of(models), settings)
    logger.info(plan.line())
    if accelerator.device.type == "cuda":
        card = torch.cuda.get_device_properties(accelerator.device)
        if plan.peak + CUDA_RESERVE > card.total_memory:
            logger.warning("that is more than the %.1f GiB of this %s: expect out-of-memory errors or a crawl "
                           "through shared memory; --low_memory, --gradient_checkpointing or a lower --resolution "
                           "fit less (dreambooth-moslora plan shows what each saves)", card.total_memory / GIB, card.name)


def _warn_about_resolution(resolution: int, models, name: str):
    native = native_resolution(models.unet.config, models.vae.config)
    if not native / 2 <= resolution <= native * 2:
        logger.warning("--resolution %d is far from the %d px that %s was trained at: expect poor results and, "
                       "above it, much slower steps", resolution, native, name)


def _generate_class_images(args, accelerator, models, concept):
    """A concept's missing class images, made with the base pipeline (processes share the work)."""
    missing = missing_class_indices(concept.class_data_dir, concept.num_class_images)
    if missing:
        logger.info("generating %d class images for %r", len(missing), concept.class_prompt)
        with accelerator.split_between_processes(missing) as mine, accelerator.autocast(), \
                decoding_outside_autocast(models.vae):
            generate_class_images(sdxl_pipeline(models), concept.class_data_dir,
                                  list(concept.class_prompts) or [concept.class_prompt], mine, args.sample_batch_size,
                                  args.resolution, args.num_inference_steps, args.seed,
                                  show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()


def _inject_adapters(args, models) -> dict:
    """The UNet with its MoSLoRA layers; the text encoders with theirs (--train_text_encoder) and the trigger's
    learned embedding (--train_trigger_embedding)."""
    unet_config = MoSLoRAConfig(rank=args.rank, alpha=args.lora_alpha, mixer_init=args.mixer_init,
                                target_modules=args.target_modules, dropout=args.lora_dropout,
                                use_rslora=args.use_rslora, train_mixer=not args.freeze_mixer)
    inject_moslora(models.unet, unet_config)
    adapted = {"unet": models.unet}
    if args.train_text_encoder:
        text_config = replace(unet_config, target_modules=TEXT_ENCODER_TARGETS)
        for name, encoder in zip(TEXT_ENCODERS, models.text_encoders):
            inject_moslora(encoder, text_config)
            adapted[name] = encoder
    if args.train_trigger_embedding:
        for name, encoder, tokenizer in zip(TEXT_ENCODERS, models.text_encoders, models.tokenizers):
            token = trigger_token(tokenizer, args.train_trigger_embedding)
            install_trigger_embedding(encoder, token, tokenizer.convert_tokens_to_ids(token))
            adapted[name] = encoder
    if args.base_weights_dtype == "fp8":
        store_frozen_weights_in_fp8(models.unet)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for name in TEXT_ENCODERS:
            if name in adapted:
                enable_text_encoder_checkpointing(adapted[name])
    if args.enable_xformers_memory_efficient_attention:
        try:
            models.unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            raise UserInputError(f"--enable_xformers_memory_efficient_attention: {error}") from None
    return adapted


def _build_optimizer(args, adapted, num_processes):
    scale = args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else 1
    groups = [{"params": moslora_parameters(adapted["unet"]), "lr": args.learning_rate * scale}]
    text_params = [p for name in TEXT_ENCODERS if name in adapted for p in moslora_parameters(adapted[name])]
    if text_params:
        groups.append({"params": text_params, "lr": args.text_encoder_lr * scale})
    trigger_params = [p for name in TEXT_ENCODERS if name in adapted for p in trigger_parameters(adapted[name])]
    if trigger_params:
        groups.append({"params": trigger_params, "lr": args.trigger_embedding_lr * scale})
    common = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, **common, fused=_fused_kernel_available(groups))
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserInputError("--optimizer adamw8bit needs bitsandbytes: pip install 'dreambooth-moslora[bnb]'") from None
        return bitsandbytes.optim.AdamW8bit(groups, **common)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserInputError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
    return Prodigy(groups, **common)


def _fused_kernel_available(groups) -> bool:
    """PyTorch's one-kernel AdamW where it has one: hundreds of small adapter tensors make the per-tensor loop a
    tenth of a small model's step on a CPU (the fused kernel takes a fifth of that)."""
    return all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])


def _micro_batches_per_epoch(args, training_set, num_processes) -> int:
    return len(epoch_batches(training_set.epoch(0), args.train_batch_size, args.seed, 0)) // num_processes


def _build_caches(args, accelerator, models, examples, settings, samples: int):
    """What `settings` (plan_settings, the plan's own decisions) say to cache."""
    start = time.perf_counter()
    show = accelerator.is_local_main_process
    latents = None
    if settings.cache_latents:
        latents = cache_latent_distributions(models.vae, examples, args.random_flip, show_progress=show)
    prompts = None
    if settings.prompts_cached:
        captions = [e.caption for e in examples] + ([""] if args.caption_dropout else [])
        prompts = cache_prompt_embeddings(models.text_encoders, models.tokenizers, captions,
                                          accelerator.device, show_progress=show)
    if accelerator.is_main_process:
        logger.info(
            "caching took %.1f s: %s; %s", time.perf_counter() - start,
            f"{len(latents)} VAE encodings replace {samples} (one per sample per step)" if latents is not None
            else "latents are encoded every step (random crops; --center_crop allows caching)",
            f"{len(prompts)} prompt encodings replace {samples}" if prompts is not None
            else "prompts are encoded every step",
        )
    return latents, prompts


def _check_resume_base(args, output_dir):
    """Resuming on another single-file base is caught before any model is loaded."""
    path = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if path is not None:
        check_same_base(recorded_base_sha256(path / NATIVE_FILE), args.pretrained_model_name_or_path, path)


def _resume(args, output_dir, adapted, optimizer, lr_scheduler, ema, grad_scaler, max_steps: int) -> int:
    if not args.resume_from_checkpoint:
        return 0
    path = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if path is None:
        logger.info("no checkpoint in %s yet; starting from step 0", output_dir)
        return 0
    step = load_checkpoint(path, adapted, optimizer, lr_scheduler, ema, grad_scaler)
    logger.info("resumed from %s at step %d", path, step)
    built_for = checkpoint_state(path).get("schedule")
    if built_for and built_for != _schedule(args, max_steps) and "constant" not in {built_for["name"], args.lr_scheduler}:
        logger.warning("the %s learning-rate schedule of %s was built for %d steps; from step %d it follows a %s "
                       "schedule for %d steps, so the run is not the one a straight %d-step run would have made",
                       built_for["name"], path, built_for["steps"], step, args.lr_scheduler, max_steps, max_steps)
    return step


def _schedule(args, max_steps: int) -> dict:
    return {"name": args.lr_scheduler, "steps": max_steps}


def _checkpoint(args, output_dir, step, accelerator, adapted, optimizer, lr_scheduler, ema, max_steps: int):
    """Only from finite weights (every process checks its identical copy, so all stop together), so the newest
    checkpoint is always one to go back to."""
    if not weights_are_finite(adapted):
        raise TrainingDiverged(f"the adapter's weights became non-finite by step {step}; checkpoint-{step} was not "
                               f"written and no adapter was; {last_good_checkpoint(output_dir)}. {DIVERGENCE_ADVICE}")
    path = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        path = save_checkpoint(output_dir, step, adapted, optimizer, lr_scheduler,
                               model_reference(args.pretrained_model_name_or_path), ema,
                               base_model_sha256(args.pretrained_model_name_or_path), accelerator.scaler,
                               _schedule(args, max_steps))
        prune_checkpoints(output_dir, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return path


def _adapter_files(args, folder: Path, adapted) -> list[Path]:
    """The native file, then the exports of it, into folder."""
    native = save_moslora(folder / NATIVE_FILE, adapted["unet"], adapted.get("text_encoder"),
                          adapted.get("text_encoder_2"), base_model=model_reference(args.pretrained_model_name_or_path),
                          base_model_sha256=base_model_sha256(args.pretrained_model_name_or_path))
    files = [native, export_diffusers(native, folder / DIFFUSERS_FILE), export_kohya(native, folder / KOHYA_FILE)]
    if args.train_trigger_embedding:
        files.append(export_trigger_embedding(native, folder / TRIGGER_FILE))
    return files


def _write_outputs(args, output_dir, adapted, steps, images, measured=None) -> list[Path]:
    """The adapter files (the chosen step's with --keep best), then the model card."""
    files = (measured.keep_best(output_dir) if measured and args.keep == "best" else []) \
        or _adapter_files(args, output_dir, adapted)
    card = model_card(model_reference(args.pretrained_model_name_or_path), "; ".join(args.dataset.instance_prompts),
                      moslora_config(adapted["unet"]), steps, args.train_text_encoder, args.validation_prompt, images,
                      output_dir, ema_decay=args.ema_decay if args.use_ema else None,
                      model_config=args.model_config and str(Path(args.model_config).expanduser().resolve()),
                      trigger=args.train_trigger_embedding,
                      chosen=measured.summary() if measured else None, kept=args.keep)
    return files + [write_text_atomically(output_dir / "README.md", card)]


def _summary(steps, seconds, files, device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"peak GPU memory {peak:.2f} GiB"
    else:
        memory = f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    per_step = seconds / steps if steps else float("nan")
    print(f"trained {steps} steps in {seconds:.1f} s ({per_step:.2f} s/step), {memory}; "
          f"wrote {', '.join(str(f) for f in files)}", flush=True)


def _tracker_config(args) -> dict:
    """Tracker hyperparameters must be plain scalars."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)) for k, v in vars(args).items()}
