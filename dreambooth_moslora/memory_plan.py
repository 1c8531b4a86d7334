"""Will it fit? The peak accelerator memory of a training step, predicted before anything is downloaded or loaded.

The real architecture is built from its configs on the meta device (no weights, no memory), adapted as training
would adapt it, and one step's forward and backward are run there. Every tensor the step creates is
counted while it lives (`LiveTensorBytes`, a dispatch mode), so the peak of activations and gradients is what the
step really keeps, with gradient checkpointing and the caching of prompts and latents as chosen. On the meta device
attention would take the math path and keep the L×L attention matrix, which the fused kernels a GPU runs (flash,
memory-efficient, xformers) never keep; `fused_attention` runs the memory-efficient kernel's own meta form instead.
Weights, adapter and optimizer state are added from their sizes.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .conditioning import encode_latent_distribution, encode_prompts
from .config import TEXT_ENCODER_TARGETS, MoSLoRAConfig
from .fp8 import store_frozen_weights_in_fp8
from .inject import inject_moslora, moslora_parameters
from .models import enable_text_encoder_checkpointing
from .sdxl import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
from .trigger import install_trigger_embedding, trigger_parameters
from .single_file import is_single_file

GIB = 2**30
CARD_SIZES_GB = (8, 12, 16, 24)
CUDA_RESERVE = 0.8 * GIB
"""What a card holds besides tensors: the CUDA context and the allocator's slack (not in max_memory_allocated)."""
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
"""Per trainable parameter: AdamW keeps two fp32 moments, bitsandbytes' 8-bit AdamW two bytes, Prodigy four fp32."""
CACHED_IMAGES = 20
"""Instance photos assumed when the plan has no folder to count (DreamBooth's 3-20)."""


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, counted while they live; `peak` is the most alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:  # not a view
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key):
        self.live -= self._sizes.pop(key)


@contextlib.contextmanager
def fused_attention():
    """scaled_dot_product_attention on meta tensors as the fused GPU kernels run it: the output and a log-sum-exp
    are kept for backward, never the attention matrix."""
    original = F.scaled_dot_product_attention

    def memory_efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = memory_efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


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
    vae_fp16_safe: bool = False
    base_weights_fp8: bool = False
    offload_frozen: bool = True
    """Text encoders and VAE off the accelerator once prompts and latents are cached (as train does on a GPU; on
    the CPU everything stays where it is)."""
    cached_images: int = CACHED_IMAGES

    @property
    def text_encoders_trained(self) -> bool:
        return self.train_text_encoder or self.learned_trigger

    @property
    def prompts_cached(self) -> bool:
        return not self.text_encoders_trained


@dataclass
class MemoryPlan:
    settings: PlanSettings
    weights: dict[str, int] = field(default_factory=dict)
    """Frozen weights on the accelerator, per component."""
    offloaded: dict[str, int] = field(default_factory=dict)
    """Frozen weights kept off the accelerator (offloading)."""
    adapter: int = 0
    optimizer_state: int = 0
    caches: int = 0
    step_peak: int = 0
    """Activations and gradients at the step's peak, counted on the meta device."""

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.adapter + self.optimizer_state + self.caches + self.step_peak

    def fits(self, card_gb: float) -> bool:
        return self.total + CUDA_RESERVE <= card_gb * GIB  # an "8 GB" card holds 8 GiB

    def line(self) -> str:
        weights = sum(self.weights.values())
        return (f"predicted peak training memory {self.total / GIB:.1f} GiB: frozen weights {weights / GIB:.1f}, "
                f"adapter and optimizer {(self.adapter + self.optimizer_state) / GIB:.2f}, activations and gradients "
                f"{self.step_peak / GIB:.1f} (plus ~{CUDA_RESERVE / GIB:.1f} GiB CUDA context)")


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
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    inject_moslora(unet, MoSLoRAConfig(rank=settings.rank, target_modules=settings.target_modules))
    if settings.base_weights_fp8:
        store_frozen_weights_in_fp8(unet)
    if settings.train_text_encoder:
        for encoder in text_encoders:
            inject_moslora(encoder, MoSLoRAConfig(rank=settings.rank, target_modules=TEXT_ENCODER_TARGETS))
    if settings.learned_trigger:
        for encoder in text_encoders:
            install_trigger_embedding(encoder, "trigger", 0)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders if settings.text_encoders_trained else ():
            enable_text_encoder_checkpointing(encoder)
    return unet, vae, text_encoders


def plan_memory(configs: ModelConfigs, settings: PlanSettings) -> MemoryPlan:
    """Build the models on the meta device and run one training step there, counting what it keeps."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.mixed_precision]
    unet, vae, text_encoders = _meta_models(configs, settings, dtype)
    trained = [unet, *(text_encoders if settings.text_encoders_trained else ())]
    plan = MemoryPlan(settings)
    plan.weights["UNet"] = _parameter_bytes(unet, trainable=False)
    frozen_elsewhere = {"text encoders": sum(_parameter_bytes(e, trainable=False) for e in text_encoders),
                        "VAE": _parameter_bytes(vae, trainable=False)}
    can_offload = {"text encoders": settings.prompts_cached, "VAE": settings.cache_latents}
    for name, size in frozen_elsewhere.items():
        (plan.offloaded if settings.offload_frozen and can_offload[name] else plan.weights)[name] = size
    parameters = [p for model in trained for p in moslora_parameters(model) + trigger_parameters(model)]
    plan.adapter = sum(p.numel() * p.element_size() for p in parameters)
    plan.optimizer_state = OPTIMIZER_STATE_BYTES[settings.optimizer] * sum(p.numel() for p in parameters)
    plan.caches = _cache_bytes(configs, settings, dtype)
    plan.step_peak = _step_peak(unet, vae, text_encoders, configs, settings, dtype, parameters)
    return plan


def _latent_side(configs: ModelConfigs, resolution: int) -> int:
    return resolution // 2 ** (len(configs.vae["block_out_channels"]) - 1)


def _cache_bytes(configs: ModelConfigs, settings: PlanSettings, dtype: torch.dtype) -> int:
    """Cached latent distributions (mean and std, fp32, each image and its flip) and prompt embeddings."""
    side = _latent_side(configs, settings.resolution)
    latents = 2 * 2 * configs.vae["latent_channels"] * side * side * 4 if settings.cache_latents else 0
    prompts = 0
    if settings.prompts_cached:
        width = sum(c.hidden_size for c in configs.text_encoders)
        prompts = (77 * width + configs.text_encoders[1].projection_dim) * torch.finfo(dtype).bits // 8
    return settings.cached_images * (latents + prompts)


def _step_peak(unet, vae, text_encoders, configs, settings, dtype, parameters) -> int:
    """Forward and backward on the meta device: the most bytes of activations and gradients alive at once. (The
    optimizer's moments are counted from their size; its step's temporaries are one parameter's at a time.)"""
    batch, pixels = settings.batch_size, settings.resolution
    side = _latent_side(configs, pixels)
    counter, meta = LiveTensorBytes(), torch.device("meta")
    with fused_attention(), counter:
        if not settings.cache_latents:
            encode_latent_distribution(vae, torch.empty(batch, 3, pixels, pixels, device=meta))
        latents = torch.empty(batch, unet.config.in_channels, side, side, dtype=dtype, device=meta)
        if settings.prompts_cached:
            width = sum(c.hidden_size for c in configs.text_encoders)
            prompt_embeds = torch.empty(batch, 77, width, dtype=dtype, device=meta)
            pooled = torch.empty(batch, configs.text_encoders[1].projection_dim, dtype=dtype, device=meta)
        else:
            tokenizers = [_MetaTokenizer(c.max_position_embeddings) for c in configs.text_encoders]
            prompt_embeds, pooled = encode_prompts(text_encoders, tokenizers, [""] * batch, meta)
        time_ids = torch.empty(batch, 6, dtype=dtype, device=meta)
        prediction = unet(latents, torch.zeros(batch, dtype=torch.long, device=meta), prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        F.mse_loss(prediction.float(), torch.empty(prediction.shape, device=meta)).backward()
    for parameter in parameters:
        parameter.grad = None
    return counter.peak


def configs_of(models) -> ModelConfigs:
    """The configs of models already loaded (train plans the run it is about to make)."""
    return ModelConfigs(dict(models.unet.config), dict(models.vae.config),
                        tuple(e.config for e in models.text_encoders), "the loaded base model")


def plan_settings(args, cached_images: int = CACHED_IMAGES, cache_latents: bool | None = None) -> PlanSettings:
    """The memory-relevant part of `train`'s options (cache_latents: what the trainer decided, when known)."""
    return PlanSettings(
        resolution=args.resolution, batch_size=args.train_batch_size, mixed_precision=args.mixed_precision or "no",
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, rank=args.rank,
        target_modules=tuple(args.target_modules), train_text_encoder=args.train_text_encoder,
        learned_trigger=bool(args.train_trigger_embedding),
        cache_latents=args.cache_latents is not False if cache_latents is None else cache_latents,
        vae_fp16_safe=bool(args.pretrained_vae_model_name_or_path), base_weights_fp8=args.base_weights_dtype == "fp8",
        cached_images=cached_images)


def presets(settings: PlanSettings) -> dict[str, PlanSettings]:
    """The usual ways to fit SDXL, at the user's resolution, batch, rank and targets."""
    bf16 = replace(settings, mixed_precision="bf16", gradient_checkpointing=False, optimizer="adamw",
                   train_text_encoder=False, learned_trigger=False, cache_latents=True)
    return {
        "bf16": bf16,
        "bf16 + gradient checkpointing": replace(bf16, gradient_checkpointing=True),
        "bf16 + checkpointing + 8-bit AdamW": replace(bf16, gradient_checkpointing=True, optimizer="adamw8bit"),
        "--low_memory (+ fp8 base weights)": replace(bf16, gradient_checkpointing=True, optimizer="adamw8bit",
                                                     base_weights_fp8=True),
        "bf16 + checkpointing + text encoders trained": replace(bf16, gradient_checkpointing=True,
                                                                train_text_encoder=True),
    }


def plan_report(configs: ModelConfigs, settings: PlanSettings) -> str:
    """Your settings' breakdown, then the presets, each marked against the usual card sizes."""
    plan = plan_memory(configs, settings)
    rows = [*((f"{name} weights", size) for name, size in plan.weights.items()),
            ("adapter weights (fp32)", plan.adapter), (f"optimizer state ({settings.optimizer})", plan.optimizer_state),
            (f"cached latents and prompts ({settings.cached_images} images)", plan.caches),
            ("activations and gradients (peak of the step)", plan.step_peak)]
    lines = [f"memory plan: {configs.source}, {settings.resolution} px, batch {settings.batch_size}, "
             f"{'fp32' if settings.mixed_precision == 'no' else settings.mixed_precision}, rank {settings.rank} on "
             f"{','.join(settings.target_modules)}{', fp8 base weights' if settings.base_weights_fp8 else ''}"
             f"{', gradient checkpointing' if settings.gradient_checkpointing else ''}"
             f"{', text encoders trained' if settings.train_text_encoder else ''}"
             f"{', trigger embedding learned' if settings.learned_trigger else ''}", ""]
    lines += [f"  {label:<52} {size / GIB:7.2f} GiB" for label, size in rows]
    lines += [f"  {'total (what torch.cuda.max_memory_allocated reports)':<52} {plan.total / GIB:7.2f} GiB"]
    lines += [f"  {name} kept off the accelerator once cached: {size / GIB:.2f} GiB" for name, size in plan.offloaded.items()]
    lines += [f"  fits a card of {_fits(plan)} (with ~{CUDA_RESERVE / GIB:.1f} GiB for the CUDA context)", ""]
    lines += [f"presets at {settings.resolution} px:", "",
              "| preset | predicted peak | " + " | ".join(f"{gb} GB" for gb in CARD_SIZES_GB) + " |",
              "| --- " * (2 + len(CARD_SIZES_GB)) + "|"]
    for name, preset in presets(settings).items():
        planned = plan if preset == settings else plan_memory(configs, preset)
        marks = " | ".join("✓" if planned.fits(gb) else "✗" for gb in CARD_SIZES_GB)
        lines.append(f"| {name} | {planned.total / GIB:.1f} GiB | {marks} |")
    return "\n".join(lines) + "\n"


def _fits(plan: MemoryPlan) -> str:
    sizes = [f"{gb} GB" for gb in CARD_SIZES_GB if plan.fits(gb)]
    return ", ".join(sizes) if sizes else f"more than {CARD_SIZES_GB[-1]} GB"
