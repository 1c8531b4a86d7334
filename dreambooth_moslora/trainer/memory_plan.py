"""Will it fit? The peak accelerator memory of a run, predicted before anything is downloaded or loaded.

The real architecture is built from its configs on the meta device (no weights, no memory), adapted as training
would adapt it, and one step's forward and backward are run there, counted as a GPU would hold them
(meta_memory.py: live tensors, the fused attention kernels, CUDA autocast's casts). So the peak of activations and
gradients is what the step really keeps, with gradient checkpointing and the caching of prompts and latents as
chosen. The step is the trainer's own `denoising_loss`, and `plan_settings` is where the trainer's caching and
placement decisions are made, so the plan and the run cannot drift apart. Weights, adapter, its moving average
and the optimizer state are added from their sizes; a GradScaler (fp16) holds a few scalars.

Outside the step the VAE is the peak: on an H200 the stock fp32 VAE took ~3 GiB to encode a 1024 px photo and
~4 GiB to decode one, more than the bf16 step with checkpointing. Setup (encoding the photos) and validation
(sampling and decoding) are counted the same way, whole and in the half-size tiles the trainer falls back to when
a card runs out (pipeline/vae_tiling.py); a card fits when the run fits with that fallback.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..adapter.config import TEXT_ENCODER_TARGETS, MoSLoRAConfig
from ..adapter.inject import inject_moslora, moslora_disabled, moslora_parameters
from ..adapter.trigger import install_trigger_embedding, trigger_parameters
from ..pipeline.models import enable_text_encoder_checkpointing
from ..pipeline.sdxl import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
from ..pipeline.single_file import is_single_file
from ..pipeline.vae_tiling import fit_vae_to_card, half_size_tiles
from .caching import latents_are_cacheable
from .conditioning import encode_latent_distribution, encode_prompts, sample_latents
from .data import image_files
from .fp8 import store_frozen_weights_in_fp8
from .meta_memory import LiveTensorBytes, emulated_autocast, fused_attention
from .step import LossSettings, StepInputs, denoising_loss

GIB = 2**30
CARD_SIZES_GB = (8, 12, 16, 24)
CUDA_RESERVE = 0.8 * GIB
"""What a card holds besides tensors: the CUDA context and the allocator's slack (not in max_memory_allocated)."""
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
"""Per trainable parameter: AdamW keeps two fp32 moments, bitsandbytes' 8-bit AdamW two bytes, Prodigy four fp32."""
CACHED_IMAGES = 20
"""Instance photos assumed when the plan has no folder to count (DreamBooth's 3-20)."""


class _MetaTokenizer:
    """Token ids of the right shape for `encode_prompts`, on the meta device: the plan has no tokenizer files."""

    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length

    def __call__(self, prompts, max_length: int, **options):
        return SimpleNamespace(input_ids=torch.zeros(len(prompts), max_length, dtype=torch.long, device="meta"))


@dataclass(frozen=True)
class PlanSettings:
    """The training options that decide memory, as `train` takes them."""

    resolution: int = 1024
    batch_size: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    rank: int = 4
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_text_encoder: bool = False
    learned_trigger: bool = False
    """--train_trigger_embedding: prompts pass through the text encoders with gradients, as with their adapters."""
    cache_latents: bool = True
    cache_prompts: bool = True
    """--no_cache_prompts turns it off; trained text encoders (adapters or the trigger) never cache."""
    vae_fp16_safe: bool = False
    base_weights_fp8: bool = False
    offload_frozen: bool = True
    """Text encoders and VAE off the accelerator once prompts and latents are cached (as train does on a GPU; on
    the CPU everything stays where it is)."""
    cached_images: int = CACHED_IMAGES
    lora_dropout: float = 0.0
    ema_on_accelerator: bool = False
    """--use_ema with its average kept on the accelerator (the default --ema_device)."""
    base_model_prior: bool = False
    """The base-model prior's second, gradient-free UNet pass on class examples."""
    samples: bool = True
    """Validation or class images sample after setup; a run with neither never decodes."""
    sample_batch_size: int = 4
    """Images sampled at once (--sample_batch_size, validation's and class images'): the UNet's batch is twice that
    with guidance; the VAE decodes them one at a time."""

    @property
    def text_encoders_trained(self) -> bool:
        return self.train_text_encoder or self.learned_trigger

    @property
    def prompts_cached(self) -> bool:
        return self.cache_prompts and not self.text_encoders_trained

    @property
    def offloaded_models(self) -> tuple[str, ...]:
        """What the trainer moves off the accelerator once its outputs are cached."""
        if not self.offload_frozen:
            return ()
        return (*(("text encoders",) if self.prompts_cached else ()), *(("VAE",) if self.cache_latents else ()))


@dataclass(frozen=True)
class OutsideStepActivations:
    """Peak activations of setup's and validation's work for one image, counted on the meta device."""

    whole_encode: int
    tiled_encode: int
    whole_decode: int
    tiled_decode: int
    unet_sampling: int
    """One denoising step of --sample_batch_size samples with classifier-free guidance (twice as many)."""

    def encode(self, tiled: bool) -> int:
        return self.tiled_encode if tiled else self.whole_encode

    def decode(self, tiled: bool) -> int:
        return self.tiled_decode if tiled else self.whole_decode


@dataclass
class MemoryPlan:
    settings: PlanSettings
    weights: dict[str, int] = field(default_factory=dict)
    """Frozen weights on the accelerator, per component."""
    offloaded: dict[str, int] = field(default_factory=dict)
    """Frozen weights kept off the accelerator (offloading)."""
    adapter: int = 0
    ema: int = 0
    """The adapter's moving average, when kept on the accelerator."""
    optimizer_state: int = 0
    caches: int = 0
    step_peak: int = 0
    """Activations and gradients at the step's peak, counted on the meta device."""
    outside_step: OutsideStepActivations = field(default_factory=lambda: OutsideStepActivations(0, 0, 0, 0, 0))

    @property
    def total(self) -> int:
        """The training step's peak: what torch.cuda.max_memory_allocated reports over the steps."""
        return sum(self.weights.values()) + self.adapter + self.ema + self.optimizer_state + self.caches + self.step_peak

    @property
    def setup_weights(self) -> int:
        """Every frozen model and the adapter on the card, as setup places them before any caching."""
        return sum(self.weights.values()) + sum(self.offloaded.values()) + self.adapter

    def setup(self, tiled: bool = False) -> int:
        """Loading and caching: the setup weights, the moving average, and the VAE encoding a photo to cache it
        (class images are sampled with less resident than validation, in batches of the same size, so validation
        covers them)."""
        encode = self.outside_step.encode(tiled) if self.settings.cache_latents else 0
        return self.setup_weights + self.ema + encode

    def validation(self, tiled: bool = False) -> int:
        """Validation mid-run: the offloaded models back beside the step's resident state, and the larger of the
        UNet's sampling and the VAE's decoding (neither when the run never samples)."""
        sampling = (max(self.outside_step.unet_sampling, self.outside_step.decode(tiled)) if self.settings.samples
                    else 0)
        return self.setup_weights + self.ema + self.optimizer_state + self.caches + sampling

    @property
    def peak(self) -> int:
        """The run's peak with the VAE on whole images."""
        return max(self.total, self.setup(), self.validation())

    @property
    def least(self) -> int:
        """The least a card must hold: the peak with the VAE in tiles, which the trainer falls back to."""
        return max(self.total, self.setup(tiled=True), self.validation(tiled=True))

    def fits(self, card_gb: float) -> bool:
        return self.least + CUDA_RESERVE <= card_gb * GIB  # an "8 GB" card holds 8 GiB

    def line(self) -> str:
        weights = sum(self.weights.values())
        return (f"predicted peak training memory {self.total / GIB:.1f} GiB: frozen weights {weights / GIB:.1f}, "
                f"adapter and optimizer {(self.adapter + self.ema + self.optimizer_state) / GIB:.2f}, activations "
                f"and gradients {self.step_peak / GIB:.1f}; setup {self.setup() / GIB:.1f} and validation "
                f"{self.validation() / GIB:.1f}; a card needs at least {self.least / GIB:.1f} GiB with the VAE in "
                f"tiles, plus ~{CUDA_RESERVE / GIB:.1f} GiB CUDA context")


@dataclass
class ModelConfigs:
    """What the plan builds: the UNet, VAE and text-encoder configs, from a folder or SDXL's own."""

    unet: dict
    vae: dict
    text_encoders: tuple[CLIPTextConfig, CLIPTextConfig]
    source: str


def model_configs(name_or_path: str, model_config=None) -> ModelConfigs:
    """A local diffusers folder's configs (or --model_config's for a single file); for a hub id, which cannot be
    read offline, SDXL base 1.0's (every SDXL fine-tune shares its architecture)."""
    folder = model_config if is_single_file(name_or_path) else name_or_path
    if folder and Path(folder).expanduser().is_dir():
        folder = str(Path(folder).expanduser())
        return ModelConfigs(
            unet=dict(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            vae=dict(AutoencoderKL.load_config(folder, subfolder="vae")),
            text_encoders=tuple(CLIPTextConfig.from_pretrained(folder, subfolder=sub)
                                for sub in ("text_encoder", "text_encoder_2")),
            source=folder)
    return ModelConfigs(dict(SDXL_UNET_CONFIG), dict(SDXL_VAE_CONFIG),
                        tuple(CLIPTextConfig(**c) for c in SDXL_TEXT_ENCODER_CONFIGS), "SDXL base 1.0 architecture")


def _parameter_bytes(model: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad == trainable)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Models built straight in their dtype (a later .to(dtype) makes diffusers warn about every model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _meta_models(configs: ModelConfigs, settings: PlanSettings, dtype: torch.dtype):
    with torch.device("meta"), _default_dtype(dtype):
        unet = UNet2DConditionModel.from_config(configs.unet)
        text_encoders = (CLIPTextModel(configs.text_encoders[0]), CLIPTextModelWithProjection(configs.text_encoders[1]))
    with torch.device("meta"), _default_dtype(dtype if settings.vae_fp16_safe else torch.float32):
        vae = AutoencoderKL.from_config(configs.vae)
    fit_vae_to_card(vae)  # batches encoded one image at a time, as the trainer's VAE
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    config = MoSLoRAConfig(rank=settings.rank, target_modules=settings.target_modules, dropout=settings.lora_dropout)
    inject_moslora(unet, config)
    if settings.base_weights_fp8:
        store_frozen_weights_in_fp8(unet)
    if settings.train_text_encoder:
        for encoder in text_encoders:
            inject_moslora(encoder, replace(config, target_modules=TEXT_ENCODER_TARGETS))
    if settings.learned_trigger:
        for encoder in text_encoders:
            install_trigger_embedding(encoder, "trigger", 0)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders if settings.text_encoders_trained else ():
            enable_text_encoder_checkpointing(encoder)
        if settings.mixed_precision != "no":
            for module in (m for model in (unet, *text_encoders) for m in model.modules()):
                if getattr(module, "_gradient_checkpointing_func", None) is not None:
                    module._gradient_checkpointing_func = functools.partial(_checkpoint_in_autocast, dtype)
    return unet, vae, text_encoders


def _checkpoint_in_autocast(dtype: torch.dtype, function, *args):
    """Checkpointing as the models do it, its recomputation under the emulated autocast: torch re-enters a real
    autocast for the recomputation by itself, but not a function mode."""
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), emulated_autocast(dtype)))


def plan_memory(configs: ModelConfigs, settings: PlanSettings) -> MemoryPlan:
    """Build the models on the meta device and run one training step there, counting what it keeps."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.mixed_precision]
    unet, vae, text_encoders = _meta_models(configs, settings, dtype)
    trained = [unet, *(text_encoders if settings.text_encoders_trained else ())]
    plan = MemoryPlan(settings)
    plan.weights["UNet"] = _parameter_bytes(unet, trainable=False)
    frozen_elsewhere = {"text encoders": sum(_parameter_bytes(e, trainable=False) for e in text_encoders),
                        "VAE": _parameter_bytes(vae, trainable=False)}
    for name, size in frozen_elsewhere.items():
        (plan.offloaded if name in settings.offloaded_models else plan.weights)[name] = size
    parameters = [p for model in trained for p in moslora_parameters(model) + trigger_parameters(model)]
    plan.adapter = sum(p.numel() * p.element_size() for p in parameters)
    plan.ema = 4 * sum(p.numel() for p in parameters) if settings.ema_on_accelerator else 0
    plan.optimizer_state = OPTIMIZER_STATE_BYTES[settings.optimizer] * sum(p.numel() for p in parameters)
    plan.caches = _cache_bytes(configs, settings, dtype)
    plan.step_peak = _step_peak(unet, vae, text_encoders, configs, settings, dtype, parameters)
    plan.outside_step = _outside_step_activations(unet, vae, configs, settings, dtype)
    return plan


def _latent_side(configs: ModelConfigs, resolution: int) -> int:
    return resolution // 2 ** (len(configs.vae["block_out_channels"]) - 1)


def _cache_bytes(configs: ModelConfigs, settings: PlanSettings, dtype: torch.dtype) -> int:
    """Cached prompt embeddings, which stay on the accelerator; cached latents are kept in the CPU's memory
    (caching.py), so the card holds none of them."""
    if not settings.prompts_cached:
        return 0
    width = sum(c.hidden_size for c in configs.text_encoders)
    return settings.cached_images * (77 * width + configs.text_encoders[1].projection_dim) * torch.finfo(dtype).bits // 8


def _step_peak(unet, vae, text_encoders, configs, settings, dtype, parameters) -> int:
    """The trainer's `denoising_loss` forward and backward on the meta device, under the mixed precision's
    autocast as accelerate applies it to the trained models: the most bytes of activations and gradients alive at
    once. (The optimizer's moments are counted from their size; its step's temporaries are one parameter's at a
    time.)"""
    batch, pixels = settings.batch_size, settings.resolution
    side = _latent_side(configs, pixels)
    counter, meta = LiveTensorBytes(), torch.device("meta")
    tokenizers = [_MetaTokenizer(c.max_position_embeddings) for c in configs.text_encoders]

    def autocast(applies: bool = True):
        return emulated_autocast(dtype) if applies and settings.mixed_precision != "no" else contextlib.nullcontext()

    with fused_attention(), counter:
        if settings.cache_latents:
            mean = std = torch.empty(batch, unet.config.in_channels, side, side, device=meta)
        else:
            mean, std = encode_latent_distribution(vae, torch.empty(batch, 3, pixels, pixels, device=meta))
        latents = sample_latents(mean, std, torch.empty(mean.shape, device=meta), vae.config)
        if settings.prompts_cached:
            width = sum(c.hidden_size for c in configs.text_encoders)
            prompt_embeds = torch.empty(batch, 77, width, dtype=dtype, device=meta)
            pooled = torch.empty(batch, configs.text_encoders[1].projection_dim, dtype=dtype, device=meta)
        else:
            with autocast(applies=settings.text_encoders_trained):  # accelerate wraps only the trained ones
                prompt_embeds, pooled = encode_prompts(text_encoders, tokenizers, [""] * batch, meta)
        base_prompt = (functools.partial(_base_prompt_embeddings, text_encoders, tokenizers, batch)
                       if settings.base_model_prior and settings.text_encoders_trained else None)
        inputs = StepInputs(latents, torch.empty(latents.shape, device=meta),
                            torch.zeros(batch, dtype=torch.long, device=meta), prompt_embeds, pooled,
                            torch.empty(batch, 6, dtype=torch.long, device=meta), [settings.base_model_prior] * batch)
        with autocast():
            loss = denoising_loss(unet, DDPMScheduler(), inputs, LossSettings(base_model_prior=settings.base_model_prior),
                                  dtype, base_prompt=base_prompt)
        loss.backward()
    for parameter in parameters:
        parameter.grad = None
    return counter.peak


@torch.no_grad()
def _outside_step_activations(unet, vae, configs, settings, dtype) -> OutsideStepActivations:
    """The VAE encoding a photo and decoding a sample, whole and in half-size tiles, in its own dtype (the trainer
    decodes outside autocast), and one guided UNet step of a sampling batch under the training's autocast."""
    pixels, side, meta = settings.resolution, _latent_side(configs, settings.resolution), torch.device("meta")
    image = torch.empty(1, 3, pixels, pixels, dtype=vae.dtype, device=meta)
    latent = torch.empty(1, configs.vae["latent_channels"], side, side, dtype=vae.dtype, device=meta)

    def counted(run, tiles: contextlib.AbstractContextManager = contextlib.nullcontext()) -> int:
        counter = LiveTensorBytes()
        with fused_attention(), tiles, counter:
            run()
        return counter.peak

    def encode():
        encode_latent_distribution(vae, image)

    def decode():
        vae.decode(latent)

    def unet_step():
        width, batch = sum(c.hidden_size for c in configs.text_encoders), 2 * settings.sample_batch_size
        with emulated_autocast(dtype) if settings.mixed_precision != "no" else contextlib.nullcontext():
            unet(torch.empty(batch, unet.config.in_channels, side, side, device=meta), torch.zeros(batch, device=meta),
                 encoder_hidden_states=torch.empty(batch, 77, width, dtype=dtype, device=meta),
                 added_cond_kwargs={"text_embeds": torch.empty(batch, configs.text_encoders[1].projection_dim,
                                                               dtype=dtype, device=meta),
                                    "time_ids": torch.empty(batch, 6, device=meta)})

    unet.eval()  # sampling runs without dropout
    return OutsideStepActivations(
        whole_encode=counted(encode), tiled_encode=counted(encode, half_size_tiles(vae, image, latent=False)),
        whole_decode=counted(decode), tiled_decode=counted(decode, half_size_tiles(vae, latent, latent=True)),
        unet_sampling=counted(unet_step))


@torch.no_grad()
def _base_prompt_embeddings(text_encoders, tokenizers, batch: int):
    """The base-model prior's prompts through the text encoders with their adapters off, as the trainer does."""
    with moslora_disabled(text_encoders[0]), moslora_disabled(text_encoders[1]):
        return encode_prompts(text_encoders, tokenizers, [""] * batch, torch.device("meta"))


def configs_of(models) -> ModelConfigs:
    """The configs of models already loaded (train plans the run it is about to make)."""
    return ModelConfigs(dict(models.unet.config), dict(models.vae.config),
                        tuple(e.config for e in models.text_encoders), "the loaded base model")


def plan_settings(args, examples=None, class_examples: int = 0, mixed_precision: str | None = None) -> PlanSettings:
    """What `train` does with these options and photos, decided here once: the trainer caches, offloads and keeps
    its average as these settings say, and the plan counts the same. `examples` are the training examples (the
    plan verb without a folder has none: CACHED_IMAGES photos are assumed, with crop slack as photos have, so
    latents are cached only with --center_crop or --cache_latents); `class_examples` are counted on top."""
    if examples is None:
        cache_latents = args.center_crop if args.cache_latents is None else args.cache_latents
        cached_images = CACHED_IMAGES + class_examples
    else:
        cache_latents = latents_are_cacheable(args.cache_latents, args.center_crop, examples)
        cached_images = len(examples) + class_examples
    return PlanSettings(
        resolution=args.resolution, batch_size=args.train_batch_size,
        mixed_precision=mixed_precision or args.mixed_precision or "no",
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, rank=args.rank,
        target_modules=tuple(args.target_modules), train_text_encoder=args.train_text_encoder,
        learned_trigger=bool(args.train_trigger_embedding), cache_latents=cache_latents,
        cache_prompts=args.cache_prompts, vae_fp16_safe=bool(args.pretrained_vae_model_name_or_path),
        base_weights_fp8=args.base_weights_dtype == "fp8", cached_images=cached_images,
        lora_dropout=args.lora_dropout, ema_on_accelerator=args.use_ema and args.ema_device != "cpu",
        base_model_prior=_uses_prior(args, "base_model"),
        samples=bool(args.validation_prompt) or _uses_prior(args, "class_images"),
        sample_batch_size=args.sample_batch_size)


def _uses_prior(args, prior: str) -> bool:
    """The data's, or the flags' when the plan has no data (the plan verb without photos)."""
    if args.dataset:
        return args.dataset.uses_prior(prior)
    return args.with_prior_preservation and args.prior_preservation_mode == prior


def planned_class_examples(args, instance_count: int) -> int:
    """Class examples a run will have before its class images exist: the base-model prior's captions (one per
    instance photo, or per class prompt), or --num_class_images; with a dataset file, each subject's own, and the
    photos of its shared class folders."""
    if args.dataset and args.dataset.source:
        subjects = sum(_class_examples(c.prior, c.class_prompts, len(image_files(c.image_dir)), c.num_class_images)
                       for c in args.dataset.of_role("instance"))
        return subjects + sum(len(image_files(c.image_dir)) for c in args.dataset.of_role("class"))
    if not args.with_prior_preservation:
        return 0
    return _class_examples(args.prior_preservation_mode, args.class_prompts, instance_count, args.num_class_images)


def _class_examples(prior: str, class_prompts, photos: int, num_class_images: int) -> int:
    if prior == "base_model":
        return len(class_prompts) if class_prompts else photos
    return num_class_images if prior == "class_images" else 0


PRESET_OPTIONS = {
    "bf16": [],
    "bf16 + gradient checkpointing": ["--gradient_checkpointing"],
    "bf16 + checkpointing + 8-bit AdamW": ["--gradient_checkpointing", "--optimizer", "adamw8bit"],
    "--low_memory (+ fp8 base weights)": ["--low_memory"],
    "bf16 + checkpointing + text encoders trained": ["--gradient_checkpointing", "--train_text_encoder"],
}
"""The `train` options of each preset (with --mixed_precision bf16 and --optimizer adamw), for running them."""


def presets(settings: PlanSettings) -> dict[str, PlanSettings]:
    """The usual ways to fit SDXL, at the user's resolution, batch, rank and targets."""
    bf16 = replace(settings, mixed_precision="bf16", gradient_checkpointing=False, optimizer="adamw",
                   train_text_encoder=False, learned_trigger=False)
    return {
        "bf16": bf16,
        "bf16 + gradient checkpointing": replace(bf16, gradient_checkpointing=True),
        "bf16 + checkpointing + 8-bit AdamW": replace(bf16, gradient_checkpointing=True, optimizer="adamw8bit"),
        "--low_memory (+ fp8 base weights)": replace(bf16, gradient_checkpointing=True, optimizer="adamw8bit",
                                                     base_weights_fp8=True, sample_batch_size=1),
        "bf16 + checkpointing + text encoders trained": replace(bf16, gradient_checkpointing=True,
                                                                train_text_encoder=True),
    }


def plan_report(configs: ModelConfigs, settings: PlanSettings) -> str:
    """Your settings' breakdown, then the presets, each marked against the usual card sizes."""
    plan = plan_memory(configs, settings)
    rows = [*((f"{name} weights", size) for name, size in plan.weights.items()),
            ("adapter weights (fp32)", plan.adapter), ("adapter moving average (fp32)", plan.ema),
            (f"optimizer state ({settings.optimizer})", plan.optimizer_state),
            (f"cached prompts ({settings.cached_images} images)" if settings.prompts_cached
             else "cached prompts (none)", plan.caches),
            ("activations and gradients (peak of the step)", plan.step_peak)]
    lines = [f"memory plan: {configs.source}, {settings.resolution} px, batch {settings.batch_size}, "
             f"{'fp32' if settings.mixed_precision == 'no' else settings.mixed_precision}, rank {settings.rank} on "
             f"{','.join(settings.target_modules)}{', fp8 base weights' if settings.base_weights_fp8 else ''}"
             f"{', gradient checkpointing' if settings.gradient_checkpointing else ''}"
             f"{', text encoders trained' if settings.train_text_encoder else ''}"
             f"{', trigger embedding learned' if settings.learned_trigger else ''}", ""]
    lines += [f"  {label:<52} {size / GIB:7.2f} GiB" for label, size in rows]
    lines += [f"  {'total of a step (torch.cuda.max_memory_allocated)':<52} {plan.total / GIB:7.2f} GiB"]
    lines += [f"  {name} kept off the accelerator once cached: {size / GIB:.2f} GiB" for name, size in plan.offloaded.items()]
    outside = plan.outside_step
    lines += [f"  {'VAE encoding a photo (whole / in tiles)':<52} {outside.whole_encode / GIB:7.2f} / "
              f"{outside.tiled_encode / GIB:.2f} GiB",
              f"  {'VAE decoding a sample (whole / in tiles)':<52} {outside.whole_decode / GIB:7.2f} / "
              f"{outside.tiled_decode / GIB:.2f} GiB",
              f"  {f'UNet sampling step ({settings.sample_batch_size} at a time, guided)':<52} "
              f"{outside.unet_sampling / GIB:7.2f} GiB",
              f"  {'setup (all models on the card, encoding photos)':<52} {plan.setup() / GIB:7.2f} GiB",
              f"  {'validation (models back, sampling, decoding)':<52} {plan.validation() / GIB:7.2f} GiB",
              f"  {'the least a card must hold (the VAE in tiles)':<52} {plan.least / GIB:7.2f} GiB"]
    lines += [f"  fits a card of {_fits(plan)} (with ~{CUDA_RESERVE / GIB:.1f} GiB for the CUDA context; the trainer "
              "falls back to VAE tiles when a whole image does not fit)", ""]
    lines += [f"presets at {settings.resolution} px:", "",
              "| preset | predicted peak | with VAE tiles | " + " | ".join(f"{gb} GB" for gb in CARD_SIZES_GB) + " |",
              "| --- " * (3 + len(CARD_SIZES_GB)) + "|"]
    for name, preset in presets(settings).items():
        planned = plan if preset == settings else plan_memory(configs, preset)
        marks = " | ".join("✓" if planned.fits(gb) else "✗" for gb in CARD_SIZES_GB)
        lines.append(f"| {name} | {planned.peak / GIB:.1f} GiB | {planned.least / GIB:.1f} GiB | {marks} |")
    return "\n".join(lines) + "\n"


def _fits(plan: MemoryPlan) -> str:
    sizes = [f"{gb} GB" for gb in CARD_SIZES_GB if plan.fits(gb)]
    return ", ".join(sizes) if sizes else f"more than {CARD_SIZES_GB[-1]} GB"
