"""Everything a run sets up before its first step: the models read, checked against the card, adapted and placed;
the class examples; the optimizer; the caches. The loop itself is train.py's."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from accelerate.utils import set_seed

from ..adapter.config import TEXT_ENCODER_TARGETS, MoSLoRAConfig
from ..adapter.errors import UserInputError
from ..adapter.inject import inject_moslora, moslora_parameters
from ..adapter.trigger import install_trigger_embedding, trigger_parameters, trigger_token
from ..pipeline.models import (decoding_outside_autocast, enable_text_encoder_checkpointing, load_base_models,
                               native_resolution, place_models, sdxl_pipeline)
from .agreement import decided_on_main
from .caching import cache_latent_distributions, cache_prompt_embeddings
from .data import epoch_batches
from .fp8 import store_frozen_weights_in_fp8
from .memory_plan import CUDA_RESERVE, GIB, configs_of, plan_memory, plan_settings, planned_class_examples
from .prior import generate_class_images, missing_class_indices

logger = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


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
    report_memory_plan(args, accelerator, models, instance)
    set_seed(args.seed)  # the adapter's initial A and mixer, drawn on the CPU whatever the accelerator
    adapted = inject_adapters(args, models)
    place_models(models, accelerator.device)
    return models, adapted


def report_memory_plan(args, accelerator, models, examples):
    """Before any model reaches the device: the plan's one line on an accelerator, and a warning when the card
    cannot hold even the least it needs (on the CPU there is no card to fit, and planning costs seconds)."""
    if not accelerator.is_main_process or accelerator.device.type == "cpu":
        return
    settings = plan_settings(args, examples, planned_class_examples(args, len(examples)), accelerator.mixed_precision)
    plan = plan_memory(configs_of(models), settings)
    logger.info(plan.line())
    if accelerator.device.type == "cuda":
        card = torch.cuda.get_device_properties(accelerator.device)
        if plan.least + CUDA_RESERVE > card.total_memory:
            logger.warning("the run needs at least %.1f GiB, more than the %.1f GiB of this %s: expect out-of-memory "
                           "errors or a crawl through shared memory; --low_memory, --gradient_checkpointing or a "
                           "lower --resolution fit less (dreambooth-moslora plan shows what each saves)",
                           (plan.least + CUDA_RESERVE) / GIB, card.total_memory / GIB, card.name)


def _warn_about_resolution(resolution: int, models, name: str):
    native = native_resolution(models.unet.config, models.vae.config)
    if not native / 2 <= resolution <= native * 2:
        logger.warning("--resolution %d is far from the %d px that %s was trained at: expect poor results and, "
                       "above it, much slower steps", resolution, native, name)


def generate_missing_class_images(args, accelerator, models, concept):
    """A concept's missing class images, made with the base pipeline (processes share the work). Which are missing
    is read once, by the main process: a process listing the folder after another wrote to it would split
    another list, and some images would never be made."""
    missing = decided_on_main(accelerator, lambda: missing_class_indices(concept.class_data_dir,
                                                                         concept.num_class_images))
    if missing:
        logger.info("generating %d class images for %r", len(missing), concept.class_prompt)
        with accelerator.split_between_processes(missing) as mine, accelerator.autocast(), \
                decoding_outside_autocast(models.vae):
            generate_class_images(sdxl_pipeline(models), concept.class_data_dir,
                                  list(concept.class_prompts) or [concept.class_prompt], mine, args.sample_batch_size,
                                  args.resolution, args.num_inference_steps, args.seed,
                                  show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()


def inject_adapters(args, models) -> dict:
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


def build_optimizer(args, adapted, num_processes):
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


def micro_batches_per_epoch(args, training_set, num_processes) -> int:
    return len(epoch_batches(training_set.epoch(0), args.train_batch_size, args.seed, 0)) // num_processes


def build_caches(args, accelerator, models, examples, settings, samples: int):
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
