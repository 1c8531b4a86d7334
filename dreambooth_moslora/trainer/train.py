"""DreamBooth training of SDXL with MoSLoRA over accelerate (one GPU, several, or several nodes).

`train` reads top to bottom: set up (setup.py), resume, cache, then `TrainingLoop.run`, whose steps are
`micro_step`'s latents, noise, timesteps, UNet, loss, backward, with checkpoints and validation as named hooks
between them; outputs.py writes what a run leaves. Everything random in a step is drawn from (seed, micro-batch
number, process), so a checkpoint resumed with the same processes, batch size and accumulation continues as the
uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from ..adapter.feedback import progress_bar
from ..adapter.files import check_writable_folder
from ..adapter.inject import moslora_disabled
from ..adapter.trigger import trigger_disabled
from ..pipeline.generate import GenerationSettings, generate_images
from ..pipeline.models import back_on, decoding_outside_autocast, offload_cached_models, sdxl_pipeline
from .arguments import DEFAULT_MAX_TRAIN_STEPS
from .checkpoint import last_good_checkpoint
from .conditioning import encode_latent_distribution, encode_prompts, micro_conditioning, sample_latents
from .concepts import read_concepts
from .data import MicroBatches, Sample, keep_as_is, process_micro_batches
from .ema import AdapterEMA, adapter_parameters, averaged_weights
from .interrupt import StopOnInterrupt, ignore_interrupts
from .masks import render_mask
from .measured_validation import MeasuredValidation, grouped_by_prompt, load_feature_models
from .memory_plan import plan_settings
from .output_lock import output_folder_lock
from .outputs import (DIVERGENCE_ADVICE, TrainingDiverged, adapter_files, check_resume_base, print_summary, resume,
                      write_checkpoint, write_outputs)
from .run_record import check_previous_run, set_aside_previous_run
from .setup import (TEXT_ENCODERS, build_caches, build_optimizer, generate_missing_class_images,
                    micro_batches_per_epoch, setup_models, training_dtype)
from .step import LossSettings, StepInputs, denoising_loss
from .validation_metrics import scalars

logger = logging.getLogger(__name__)
PLAN_CHUNK = 64  # micro-batches handed to one DataLoader (its workers restart between chunks)
__all__ = ["TrainingDiverged", "TrainingLoop", "TrainingResult", "train"]


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
    previous_run = check_previous_run(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    feature_models = load_feature_models(args) if accelerator.is_main_process else None
    with output_folder_lock(output_dir, enabled=accelerator.is_main_process):
        if previous_run and accelerator.is_main_process:
            set_aside_previous_run(output_dir)
        accelerator.wait_for_everyone()
        return _train(args, accelerator, output_dir, data, feature_models)


def _train(args, accelerator, output_dir: Path, data, feature_models=None) -> TrainingResult:
    # set up: models, the training set (class images made), optimizer and schedule, the run resumed, the caches
    check_resume_base(args, output_dir)
    models, adapted = setup_models(args, accelerator, data.instance_examples)
    training_set = data.training_set(lambda concept: generate_missing_class_images(args, accelerator, models, concept))
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = build_optimizer(args, adapted, accelerator.num_processes)
    max_steps = _max_steps(args, micro_batches_per_epoch(args, training_set, accelerator.num_processes))
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    prepared = accelerator.prepare(*adapted.values(), optimizer)
    trained, optimizer = dict(zip(adapted, prepared[:-1])), prepared[-1]
    ema = AdapterEMA(adapter_parameters(adapted), args.ema_decay,
                     "cpu" if args.ema_device == "cpu" else accelerator.device) if args.use_ema else None
    global_step, resumed_from = resume(args, output_dir, adapted, optimizer, lr_scheduler, ema, accelerator.scaler,
                                       max_steps)
    examples = training_set.examples()
    settings = plan_settings(args, examples, mixed_precision=accelerator.mixed_precision)
    caches = build_caches(args, accelerator, models, examples, settings,
                          samples=(max_steps - global_step) * args.train_batch_size * args.gradient_accumulation_steps)
    offloaded = offload_cached_models(models, accelerator.device, settings.prompts_cached, settings.cache_latents)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-moslora", config=_tracker_config(args))
    measured = MeasuredValidation(args, feature_models, resumed_from) if feature_models else None
    run_record = measured.run if measured else None  # the main process's: the history, the chosen step, best/
    loop = TrainingLoop(args, accelerator, models, trained, optimizer, lr_scheduler, caches,
                        training_dtype(accelerator.mixed_precision), ema, offloaded, measured,
                        write_adapter=lambda folder: adapter_files(args, folder, adapted))

    def save(step):
        return write_checkpoint(args, output_dir, step, accelerator, adapted, optimizer, lr_scheduler, ema, max_steps,
                                run_record)

    # train
    if run_record and not run_record.has_baseline:
        loop.validate(0, base_model=True)  # the measures every later step is held against, whatever the step
    start, first_step = time.perf_counter(), global_step
    with StopOnInterrupt() as stop:
        if run_record and loop.validation_due(global_step, max_steps) and not run_record.measured(global_step):
            loop.validate_mid_run(global_step, stop)  # due at the checkpoint's step, which was saved before it
        global_step = loop.run(training_set, global_step, max_steps, stop, save)
    seconds = time.perf_counter() - start
    if stop.requested:
        raise KeyboardInterrupt(f"interrupted at step {global_step}; saved {save(global_step)}; "
                                "continue with --resume_from_checkpoint latest")

    # finish: the last checkpoint, the final validation, the adapter files and model card
    if stop.stopped_early and global_step % args.checkpointing_steps:  # else its checkpoint is saved already
        save(global_step)
    files = []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with averaged_weights(ema):  # the exported adapter is the average, as validation shows it
            images = loop.validate(global_step, final=True) if args.validation_prompt else []
            files = write_outputs(args, output_dir, adapted, global_step, images, run_record)
        if stop.stopped_early:
            logger.info("stopped early at step %d: the chosen step, %s, has not changed for %d validations",
                        global_step, run_record.chosen, args.early_stopping_patience)
        print_summary(global_step - first_step, seconds, files, accelerator.device)
    accelerator.end_training()
    return TrainingResult(output_dir, global_step, seconds, files, loop.losses)


def _max_steps(args, batches_per_epoch: int) -> int:
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        return args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    return DEFAULT_MAX_TRAIN_STEPS


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
        """Micro-steps until max_steps; after each optimizer step its hooks: log, checkpoint, validate, and the
        stop every process agrees on (Ctrl-C, early stopping)."""
        args, accelerator = self.args, self.accelerator
        for model in self.trained.values():
            model.train()
        progress = progress_bar(total=max_steps, initial=global_step, desc="steps", show=accelerator.is_local_main_process)
        stream = process_micro_batches(training_set, args.train_batch_size, args.seed, accelerator.num_processes,
                                       accelerator.process_index)
        mask_renderer = render_mask if any(e.mask is not None for e in training_set.examples()) else None
        skip = global_step * args.gradient_accumulation_steps  # the micro-batches a resumed run has done
        self.step_start, micro_losses = time.perf_counter(), []
        while global_step < max_steps and not (stop.requested or stop.stopped_early):
            for number, examples, samples, pixels, masks in self._loader(stream, skip, mask_renderer):
                micro_losses.append(self.micro_step(number, examples, samples, pixels, masks))
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                self.after_optimizer_step(global_step, sum(micro_losses) / len(micro_losses), progress)
                micro_losses.clear()
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    save(global_step)  # the last one too, so a finished run can be extended
                if self.validation_due(global_step, max_steps):
                    self.validate_mid_run(global_step, stop)
                if global_step >= max_steps or stop.should_stop(accelerator):  # every process at the same step
                    break
        progress.close()
        return global_step

    def _loader(self, stream, skip: int, mask_renderer) -> DataLoader:
        """The next PLAN_CHUNK micro-batches of the stream, rendered by DataLoader workers (with their masks when
        mask_renderer is given)."""
        args = self.args
        plan = [item for _, item in zip(range(PLAN_CHUNK), stream) if item[0] >= skip]
        return DataLoader(
            MicroBatches(plan, args.seed, self.accelerator.process_index, args.random_flip, args.center_crop,
                         render_pixels=self.latent_cache is None, caption_dropout=args.caption_dropout,
                         render_mask=mask_renderer),
            batch_size=None, num_workers=args.dataloader_num_workers, collate_fn=keep_as_is,
            worker_init_fn=ignore_interrupts,
        )

    def after_optimizer_step(self, step: int, loss: float, progress):
        """The moving average, the loss history, the progress bar and the tracker."""
        if self.ema is not None:
            self.ema.update(step)
        self.losses.append(loss)
        seconds, self.step_start = time.perf_counter() - self.step_start, time.perf_counter()
        lr = self.lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        self.accelerator.log({"loss": loss, "lr": lr}, step=step)

    def validation_due(self, step: int, max_steps: int) -> bool:
        """Every --validation_steps, on the main process; the last step's validation is the final one."""
        args = self.args
        return bool(args.validation_prompt and args.validation_steps and step % args.validation_steps == 0
                    and step < max_steps and self.accelerator.is_main_process)

    def validate_mid_run(self, step: int, stop):
        """Validation with the averaged weights, and measured validation's verdict on stopping early."""
        with averaged_weights(self.ema):
            self.validate(step)
        stop.stop_early = bool(self.measured and self.measured.should_stop())

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
    def validate(self, step: int, final: bool = False, base_model: bool = False) -> list[Path]:
        """Sample the validation prompt with the adapter as it is now (with none: base_model); PNGs under
        validation/, and the tracker. A step measured already is not sampled again (an early stop's last step)."""
        args, accelerator = self.args, self.accelerator
        sampled = self.measured and self.measured.sampled_paths(step)
        if sampled:
            return sampled
        unwrap = accelerator.unwrap_model
        models = [unwrap(self.trained["unet"]), *self._text_encoders(unwrapped=True)]
        pipe = sdxl_pipeline(self.models, models[0], models[1:])
        for model in self.trained.values():
            model.eval()
        folder = Path(args.output_dir) / "validation" / (f"final-step-{step}" if final else f"step-{step}")
        prompts = [p.prompt for p in self.measured.prompts] if self.measured else [args.validation_prompt]
        settings = GenerationSettings(num_images_per_prompt=args.num_validation_images, seed=args.seed,
                                      batch_size=args.sample_batch_size,
                                      num_inference_steps=args.num_inference_steps, height=args.resolution,
                                      width=args.resolution)
        with accelerator.autocast(), decoding_outside_autocast(self.models.vae), \
                back_on(self.offloaded, accelerator.device), ExitStack() as base:
            if base_model:
                for model in models:
                    base.enter_context(moslora_disabled(model))
                    base.enter_context(trigger_disabled(model))
            paths = generate_images(pipe, prompts, settings, folder, adapter_name="" if base_model else "training",
                                    show_progress=False)
        for model in self.trained.values():
            model.train()
        _log_images(accelerator, paths, step)
        record = self.measured and self.measured.record(
            step, grouped_by_prompt(paths, self.measured.prompts, args.num_validation_images), self.write_adapter)
        if record:
            accelerator.log({f"validation/{name}": value for name, value in scalars(record).items()}, step=step)
        return paths


def _log_images(accelerator, paths, step):
    if accelerator.trackers and any(t.name == "tensorboard" for t in accelerator.trackers):
        import numpy as np
        from PIL import Image

        images = np.stack([np.asarray(Image.open(p)) for p in paths])
        accelerator.get_tracker("tensorboard").writer.add_images("validation", images, step, dataformats="NHWC")


def _tracker_config(args) -> dict:
    """Tracker hyperparameters must be plain scalars."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)) for k, v in vars(args).items()}
