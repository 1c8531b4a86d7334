"""The training command's options. Names follow diffusers' train_dreambooth_lora_sdxl.py wherever the feature
is the same; its options without a counterpart are handled in diffusers_options."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math

import torch

from ..adapter.config import MIXER_INITS, UNET_TARGETS
from ..adapter.errors import UserInputError
from ..adapter.io import KOHYA_UNET_MODULES, kohya_exportable
from ..pipeline.metrics import DEFAULT_CLIP, DEFAULT_DINO
from ..pipeline.models import check_base_model
from .dataset_config import DATA_FLAGS, dataset_from_args, dataset_toml
from .diffusers_options import add_diffusers_options, apply_diffusers_options
from .parser import CommandParser
from .prompt_words import has_trigger_word, prompt_words, read_prompts

logger = logging.getLogger(__name__)

DEFAULT_MAX_TRAIN_STEPS = 500
PRIOR_MODES = ("class_images", "base_model")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """train's options; `plan` takes the same ones (validate_args with needs_data=False: no photos needed)."""
    parser = CommandParser(
        prog=prog, description="DreamBooth fine-tuning of Stable Diffusion XL with a MoSLoRA adapter."
    )
    model = parser.add_argument_group("base model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="hub id or local folder of a diffusers SDXL pipeline, or one .safetensors file in the "
                            "original layout (A1111/ComfyUI checkpoints; needs --model_config)")
    model.add_argument("--model_config", default=None,
                       help="for a single-file model: a diffusers SDXL folder of the same architecture, whose "
                            "configs and tokenizers are used (not its weights)")
    model.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a VAE that is safe in fp16 (e.g. madebyollin/sdxl-vae-fp16-fix); without one the VAE runs in fp32")
    model.add_argument("--revision", default=None)
    model.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", help="folder with 3-20 photos of the subject")
    data.add_argument("--instance_prompt",
                      help="prompt with the trigger token, e.g. 'a photo of sks dog'; a same-named .txt beside an image overrides it")
    data.add_argument("--dataset_config", metavar="FILE", default=None,
                      help="a TOML file of concepts (several subjects, class sets, repeats, held-out photos) in "
                           "place of the single-folder data options")
    data.add_argument("--print_dataset_config", action="store_true",
                      help="print the dataset file these options mean and exit (a start for a file of your own)")
    data.add_argument("--resolution", type=int, default=1024, help="training side length in pixels (default 1024)")
    data.add_argument("--center_crop", action="store_true",
                      help="crop at the centre instead of at a random place drawn every step")
    data.add_argument("--random_flip", action="store_true", help="mirror images at random, drawn every step")
    data.add_argument("--no_bucketing", dest="bucketing", action="store_false",
                      help="square crops instead of aspect-ratio buckets")
    masked = data.add_mutually_exclusive_group()
    masked.add_argument("--mask_dir", default=None,
                        help="masked loss: a folder of same-named masks (white = subject) for the instance images")
    masked.add_argument("--alpha_mask", action="store_true",
                        help="masked loss: each instance image's alpha channel is its mask")
    data.add_argument("--unmasked_weight", type=float, default=0.0,
                      help="loss weight outside the mask (default 0: only the subject is learned)")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="probability that a training caption is replaced by the empty prompt (drawn per use)")
    data.add_argument("--repeats", type=int, default=1, help="how often each instance image appears per epoch")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    prior = parser.add_argument_group("prior preservation")
    prior.add_argument("--with_prior_preservation", action="store_true")
    prior.add_argument("--prior_preservation_mode", choices=PRIOR_MODES, default="class_images",
                       help="class_images: train on class images (generated when missing), as DreamBooth does; "
                            "base_model: the frozen base model's own prediction for --class_prompt on the instance "
                            "images is the target, no class images needed")
    prior.add_argument("--class_data_dir", default=None, help="class images; missing ones are generated here")
    prior.add_argument("--class_prompt", default=None, help="prompt of the class without the trigger, e.g. 'a photo of a dog'")
    prior.add_argument("--class_prompts_file", default=None,
                       help="several class prompts, one per line: class images are generated cycling through them "
                            "(each keeps its prompt as caption), and the base-model prior uses them as class captions")
    prior.add_argument("--num_class_images", type=int, default=100)
    prior.add_argument("--prior_loss_weight", type=float, default=1.0)
    prior.add_argument("--sample_batch_size", type=int, default=4,
                       help="batch size when generating class and validation images")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--rank", type=int, default=4)
    adapter.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1)")
    adapter.add_argument("--mixer_init", choices=MIXER_INITS, default="orthogonal",
                         help="orthogonal (default), kaiming (paper's code), identity, or none (plain LoRA)")
    adapter.add_argument("--freeze_mixer", action="store_true",
                         help="keep the mixer at its initial value (a control for comparing MoSLoRA with LoRA)")
    adapter.add_argument("--target_modules", default=",".join(UNET_TARGETS),
                         help="comma-separated UNet layer names in the attention blocks, which the kohya export can "
                              "name (default to_q,to_k,to_v,to_out.0)")
    adapter.add_argument("--lora_dropout", type=float, default=0.0)
    adapter.add_argument("--use_rslora", action="store_true", help="scale alpha/sqrt(rank) instead of alpha/rank")
    adapter.add_argument("--train_text_encoder", action="store_true",
                         help="also adapt both text encoders' attention (q/k/v/out_proj)")
    adapter.add_argument("--text_encoder_lr", type=float, default=5e-6)
    adapter.add_argument("--train_trigger_embedding", metavar="TRIGGER", default=None,
                         help="also learn the embedding of this trigger word of --instance_prompt in both text "
                              "encoders (pivotal tuning); it must be one token, such as sks")
    adapter.add_argument("--trigger_embedding_lr", type=float, default=1e-3)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=1)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None,
                       help=f"optimizer steps; overrides --num_train_epochs (default {DEFAULT_MAX_TRAIN_STEPS} when neither is given)")
    optim.add_argument("--num_train_epochs", type=int, default=None)
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--scale_lr", action="store_true",
                       help="multiply learning rates by batch size x accumulation x processes")
    optim.add_argument("--lr_scheduler", default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "prodigy"], type=str.lower,
                       help="any case, so diffusers' AdamW works")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-4)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-γ loss weighting; 5.0 is usual")
    optim.add_argument("--noise_offset", type=float, default=0.0)
    optim.add_argument("--use_ema", action="store_true",
                       help="export and validate an exponential moving average of the adapter weights")
    optim.add_argument("--ema_decay", type=float, default=0.995, help="EMA decay (default 0.995)")
    optim.add_argument("--ema_device", choices=["accelerator", "cpu"], default="accelerator",
                       help="where the average is kept: cpu saves accelerator memory")
    optim.add_argument("--seed", type=int, default=0)

    memory = parser.add_argument_group("precision and memory")
    memory.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="frozen weights in fp16/bf16, adapter in fp32 (default: accelerate's config, else no)")
    memory.add_argument("--gradient_checkpointing", action="store_true")
    memory.add_argument("--base_weights_dtype", choices=["default", "fp8"], default="default",
                        help="fp8: the frozen UNet's linear and conv weights stored in float8_e4m3fn, computed in "
                             "the training dtype (half the memory of bf16)")
    memory.add_argument("--low_memory", action="store_true",
                        help="what fits 1024 px into the least memory: gradient checkpointing, bf16 (fp16 on a GPU "
                             "without bf16; unless --mixed_precision says otherwise), fp8 base weights, 8-bit AdamW when bitsandbytes "
                             "is installed")
    memory.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                        help="xformers attention (optional extra); PyTorch's SDPA is the default")
    memory.add_argument("--allow_tf32", action="store_true")
    cache = memory.add_mutually_exclusive_group()
    cache.add_argument("--cache_latents", dest="cache_latents", action="store_true", default=None,
                       help="encode each image once (default: on unless random crops need re-encoding)")
    cache.add_argument("--no_cache_latents", dest="cache_latents", action="store_false")
    memory.add_argument("--no_cache_prompts", dest="cache_prompts", action="store_false",
                        help="encode prompts every step (only to measure what caching saves)")

    out = parser.add_argument_group("outputs and monitoring")
    out.add_argument("--output_dir", default="moslora-dreambooth")
    out.add_argument("--checkpointing_steps", type=int, default=500)
    out.add_argument("--checkpoints_total_limit", type=int, default=None)
    out.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="start afresh in a folder that holds a previous run: its checkpoints, best/, validation/ "
                          "and adapter files are moved into previous-runs/ (without this, such a folder is refused)")
    out.add_argument("--validation_prompt", default=None)
    out.add_argument("--num_validation_images", type=int, default=4)
    out.add_argument("--validation_steps", type=int, default=None,
                     help="also validate every N steps (always at the end when --validation_prompt is set)")
    out.add_argument("--num_inference_steps", type=int, default=25, help="sampling steps of validation images")
    out.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"])

    measured = parser.add_argument_group("measured validation and the chosen step")
    measured.add_argument("--validation_metrics", choices=("auto", "on", "none"), default="auto",
                          help="measure each validation (step 0 too) against your photos and choose the best step: "
                               "auto (default) when the feature models load, else a warning and plain validation; "
                               "on: they must load; none: off")
    measured.add_argument("--validation_dino_model", default=DEFAULT_DINO,
                          help=f"subject fidelity's DINO model: hub id or local folder (default {DEFAULT_DINO})")
    measured.add_argument("--validation_clip_model", default=DEFAULT_CLIP,
                          help=f"CLIP-I and CLIP-T's CLIP model: hub id or local folder (default {DEFAULT_CLIP})")
    measured.add_argument("--validation_metrics_model", default=None,
                          help="a world analyzer file (assets/world-analyzer.safetensors) in place of DINO and CLIP: "
                               "the mini world's measure, offline")
    measured.add_argument("--validation_prompt_tolerance", type=float, default=0.10,
                          help="a chosen step's prompt fidelity (CLIP-T) may fall at most this fraction below step 0's")
    measured.add_argument("--validation_class_tolerance", type=float, default=0.20,
                          help="a chosen step's class samples may move at most this much closer to your photos than "
                               "step 0's (class drift)")
    measured.add_argument("--keep", choices=("last", "best"), default="last",
                          help="which step's adapter the output folder's files hold; best/ always holds the chosen one")
    measured.add_argument("--early_stopping_patience", type=int, default=None,
                          help="stop (saving, as Ctrl-C does) when the chosen step has not changed for N validations")
    out.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    add_diffusers_options(parser)
    return parser


def validate_args(args: argparse.Namespace, needs_data: bool = True) -> argparse.Namespace:
    """Refuse combinations that cannot work, before any model is loaded."""
    apply_diffusers_options(args)
    check_base_model(args.pretrained_model_name_or_path, args.model_config)
    if args.low_memory:
        apply_low_memory(args)
    if args.resolution <= 0 or args.resolution % 8:
        raise UserInputError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("learning_rate", "text_encoder_lr", "trigger_embedding_lr"):
        rate = getattr(args, name)
        if not math.isfinite(rate) or rate <= 0:
            raise UserInputError(f"--{name} must be a positive number, got {rate}")
    if args.lr_warmup_steps < 0:
        raise UserInputError(f"--lr_warmup_steps cannot be negative, got {args.lr_warmup_steps}")
    args.class_prompts = read_prompts(prompts_file=args.class_prompts_file) if args.class_prompts_file else None
    if args.class_prompts and not args.class_prompt:
        args.class_prompt = args.class_prompts[0]
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UserInputError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
        if not args.class_data_dir and args.prior_preservation_mode == "class_images":
            raise UserInputError("--with_prior_preservation needs --class_data_dir (or --prior_preservation_mode "
                                 "base_model, which needs no class images)")
    check_at_least_one(args, ("train_batch_size", "gradient_accumulation_steps", "repeats", "rank",
                              "checkpointing_steps", "num_validation_images", "sample_batch_size",
                              "num_inference_steps", "max_train_steps", "num_train_epochs", "validation_steps",
                              "checkpoints_total_limit", "early_stopping_patience"))
    if (args.keep == "best" or args.early_stopping_patience) and not (
            args.validation_prompt and args.validation_steps and args.validation_metrics != "none"):
        raise UserInputError("--keep best and --early_stopping_patience choose among measured validations: they need "
                             "--validation_prompt and --validation_steps (and --validation_metrics not none)")
    if args.freeze_mixer and args.mixer_init == "none":
        raise UserInputError("--freeze_mixer needs a mixer to freeze; --mixer_init none has none")
    if not 0 < args.ema_decay < 1:
        raise UserInputError(f"--ema_decay must be between 0 and 1, got {args.ema_decay}")
    if not 0 <= args.unmasked_weight <= 1:
        raise UserInputError(f"--unmasked_weight must be in [0, 1], got {args.unmasked_weight}")
    if not 0 <= args.caption_dropout < 1:
        raise UserInputError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if not math.isfinite(args.prior_loss_weight) or args.prior_loss_weight < 0:  # as a dataset file's is checked
        raise UserInputError(f"--prior_loss_weight must be a finite number, not negative, got {args.prior_loss_weight}")
    if args.num_class_images < 0 or args.dataloader_num_workers < 0:
        raise UserInputError("--num_class_images and --dataloader_num_workers cannot be negative")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise UserInputError(f"--report_to {args.report_to} needs the {args.report_to} package: "
                             f"pip install {args.report_to} (or --report_to none)")
    parser = build_parser()
    args.dataset = (dataset_from_args(args, {name: parser.get_default(name) for name in DATA_FLAGS})
                    if needs_data or args.dataset_config else None)
    for prompt, class_prompt in _subject_prompts(args.dataset):
        if not has_trigger_word(prompt, class_prompt):
            logger.warning("every word of the instance prompt %r is an ordinary word: the subject gets no name of its "
                           "own and those words will draw it; add a rare trigger word, e.g. 'a photo of sks dog'",
                           prompt)
    prompts = [prompt for prompt, _ in _subject_prompts(args.dataset)]
    if prompts and args.train_trigger_embedding and not any(
            args.train_trigger_embedding.lower() in prompt_words(p) for p in prompts):
        raise UserInputError(f"--train_trigger_embedding {args.train_trigger_embedding!r} is not a word of "
                             f"the instance prompt {' or '.join(map(repr, prompts))}")
    args.target_modules = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    outside = [t for t in args.target_modules if not kohya_exportable(t)]
    if outside:
        raise UserInputError(f"--target_modules {','.join(outside)} is outside the UNet's attention blocks, which "
                             f"the kohya export written at the end needs; use names among {','.join(KOHYA_UNET_MODULES)}")
    return args


def _subject_prompts(dataset) -> list[tuple[str, str | None]]:
    return [(c.instance_prompt, c.class_prompt) for c in dataset.of_role("instance")] if dataset else []


def check_at_least_one(args: argparse.Namespace, names):
    """Counts must be at least 1; None means the option was not given."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserInputError(f"--{name} must be at least 1, got {value}")


def apply_low_memory(args: argparse.Namespace):
    args.gradient_checkpointing = True
    args.sample_batch_size = 1  # validation images are sampled mid-training, beside the optimizer state
    args.mixed_precision = args.mixed_precision or low_memory_precision()
    args.base_weights_dtype = "fp8"
    if args.optimizer == "adamw" and importlib.util.find_spec("bitsandbytes") is not None:
        args.optimizer = "adamw8bit"


def low_memory_precision() -> str:
    """bf16, except on a CUDA card without native bf16 (before Ampere), where it would be emulated: fp16 there."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("--low_memory: this GPU has no native bf16, so training runs in fp16 "
                       "(--mixed_precision bf16 to insist)")
        return "fp16"
    return "bf16"


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The checked options; --print_dataset_config prints its file and exits here, as --help does."""
    args = validate_args(build_parser(prog).parse_args(argv))
    if args.print_dataset_config:
        print(dataset_toml(args.dataset), end="")
        raise SystemExit(0)
    return args
