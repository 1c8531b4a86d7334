"""Load the frozen parts of an SDXL pipeline for training, each in the dtype it can run in."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..adapter.errors import UserInputError
from .loss import PREDICTION_TYPES
from .single_file import check_single_file, is_single_file, load_single_file_components
from .vae_tiling import fit_vae_to_card


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


# diffusers 0.42 and transformers 4.56 renamed from_pretrained's torch_dtype to dtype and warn on the old name
_DTYPE_KEYWORD = "dtype" if _version(diffusers) >= (0, 42) else "torch_dtype"
_TRANSFORMERS_DTYPE_KEYWORD = "dtype" if _version(transformers) >= (4, 56) else "torch_dtype"


@dataclass
class BaseModels:
    tokenizers: tuple
    text_encoders: tuple
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def dtype_option(dtype: torch.dtype) -> dict:
    """The keyword this diffusers' from_pretrained takes for the dtype."""
    return {_DTYPE_KEYWORD: dtype}


def model_reference(name_or_path: str) -> str:
    """What to record of a base model: an absolute path for a local folder or file (valid from anywhere), else the
    hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def native_resolution(unet_config, vae_config) -> int:
    """The side, in pixels, the model was trained at: the UNet's sample size times the VAE's downscaling."""
    return unet_config.sample_size * 2 ** (len(vae_config.block_out_channels) - 1)


def require_model_folder(name_or_path: str):
    """A name that can only be a local path must be a folder; hub ids are left to from_pretrained."""
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise UserInputError(f"model folder not found: {name_or_path}")


def check_base_model(name_or_path: str, model_config=None):
    """What can be known of a base model before loading it: a folder that is there, or a single .safetensors file
    with its configs; hub ids are left to from_pretrained."""
    if is_single_file(name_or_path):
        check_single_file(name_or_path, model_config)
    else:
        require_model_folder(name_or_path)


def model_load_error(name_or_path: str, error: Exception) -> UserInputError:
    return UserInputError(f"could not load the SDXL model {name_or_path}: {str(error).splitlines()[0]}")


def load_base_models(name_or_path: str, revision=None, variant=None, vae_name_or_path=None,
                     model_config=None, dtype: torch.dtype = torch.float32) -> BaseModels:
    """From a hub id, a local diffusers folder, or one original-layout .safetensors file with its configs in
    model_config; a path that is not there is one clear error. Weights are read straight into `dtype` on the CPU,
    so no fp32 copy of SDXL ever reaches the accelerator; the stock VAE stays fp32 (it overflows in fp16), a
    separate one (an fp16-safe VAE) takes `dtype`."""
    single_file = is_single_file(name_or_path)
    vae_dtype = dtype if vae_name_or_path else torch.float32
    check_base_model(name_or_path, model_config)
    if vae_name_or_path:
        require_model_folder(vae_name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(vae_name_or_path, **dtype_option(vae_dtype)) if vae_name_or_path else None
        parts = (load_single_file_components(name_or_path, model_config, dtype, vae=vae, vae_dtype=vae_dtype)
                 if single_file
                 else _folder_components(name_or_path, revision, variant, dtype, vae_dtype, vae))
        noise_scheduler = DDPMScheduler.from_pretrained(model_config if single_file else name_or_path,
                                                        subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise model_load_error(name_or_path, error) from None
    unet, vae = parts["unet"], parts["vae"]
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserInputError(f"{name_or_path} is not an SDXL model (its UNet has no text_time conditioning)")
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise UserInputError(
            f"{name_or_path} predicts {noise_scheduler.config.prediction_type!r}; training supports "
            f"{' and '.join(PREDICTION_TYPES)}"
        )
    text_encoders = (parts["text_encoder"], parts["text_encoder_2"])
    for model, wanted in ((unet, dtype), *((e, dtype) for e in text_encoders), (vae, vae_dtype)):
        model.requires_grad_(False)
        if model.dtype != wanted:  # a --pretrained_vae of another dtype; on the CPU, before any move
            model.to(dtype=wanted)
    fit_vae_to_card(vae)
    return BaseModels((parts["tokenizer"], parts["tokenizer_2"]), text_encoders, vae, unet, noise_scheduler)


def _folder_components(name_or_path: str, revision, variant, dtype: torch.dtype, vae_dtype: torch.dtype,
                       vae=None) -> dict:
    common = {"revision": revision}
    weights = {"variant": variant, **common}
    typed = {**weights, **dtype_option(dtype)}
    text_typed = {**weights, _TRANSFORMERS_DTYPE_KEYWORD: dtype}
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common),
        "tokenizer_2": CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **common),
        "text_encoder": CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **text_typed),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2", **text_typed),
        "vae": vae or AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **weights, **dtype_option(vae_dtype)),
        "unet": UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **typed),
    }


def sdxl_pipeline(models: BaseModels, unet=None, text_encoders=None) -> StableDiffusionXLPipeline:
    """A sampling pipeline around the models already loaded (for class images and validation), with the trained
    UNet and text encoders in place of the frozen ones when given."""
    text_encoders = text_encoders or models.text_encoders
    return StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=models.tokenizers[0],
        tokenizer_2=models.tokenizers[1], unet=unet or models.unet,
        scheduler=EulerDiscreteScheduler.from_config(models.noise_scheduler.config),
    )


def enable_text_encoder_checkpointing(encoder):
    """Non-reentrant checkpointing whatever the transformers version: 4.x defaults to reentrant, which gives the
    adapters inside a frozen encoder no gradient (no input of a checkpointed layer needs one). transformers 5
    renamed gradient_checkpointing_enable (and warns on the old name)."""
    non_reentrant = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


def models_to_offload(models: BaseModels, prompts_cached: bool, latents_cached: bool) -> list:
    return [*(models.text_encoders if prompts_cached else ()), *((models.vae,) if latents_cached else ())]


def offload_cached_models(models: BaseModels, device, prompts_cached: bool, latents_cached: bool) -> list:
    """The frozen models no step needs once their outputs are cached go to the CPU (kohya does the same with cached
    text-encoder outputs): 1.5 GB of text encoders and the VAE off an SDXL card. Returns them, for validation."""
    if torch.device(device).type == "cpu":
        return []
    offloaded = models_to_offload(models, prompts_cached, latents_cached)
    for model in offloaded:
        model.to("cpu")
    if offloaded and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return offloaded


@contextlib.contextmanager
def back_on(models: list, device):
    """Offloaded models on the accelerator for the block (validation samples with them), off again after it."""
    for model in models:
        model.to(device)
    try:
        yield
    finally:
        for model in models:
            model.to("cpu")


@contextlib.contextmanager
def decoding_outside_autocast(vae):
    """Sampling under the training's autocast, decoding outside it: diffusers' SDXL pipeline decodes under the
    caller's autocast, where fp16 overflows the stock VAE (NaN or black images, and black class images trained on
    as the prior), and hands an fp32 VAE half-precision latents. Inside the block the VAE decodes in its own dtype."""
    decode = vae.decode

    def decode_in_vae_dtype(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_in_vae_dtype
    try:
        yield
    finally:
        vae.decode = decode


def place_models(models: BaseModels, device):
    """Each model moved once, already in its final dtype (and fp8 where asked): nothing is cast on the card."""
    for model in (models.unet, *models.text_encoders, models.vae):
        model.to(device)
