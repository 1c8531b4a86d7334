"""Base models shared as one .safetensors file in the original SGM layout (what A1111 and ComfyUI load).

The UNet and the VAE come through diffusers' `from_single_file`; both text encoders are converted here, because
diffusers 0.42 leaves OpenCLIP's text_projection on the meta device (garbage pooled embeddings, NaN images, no
error), loads a CLIP-L whose keys lack `text_model.` at random, and gives CLIP-L's weights to both encoders when
they have the same width. The file holds weights only: configs and tokenizers come from a diffusers folder of the
same architecture (`--model_config`), since nothing can be downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          PreTrainedModel)

from ..adapter.errors import UserInputError

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CONFIG_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPEN_CLIP_LAYER_NAMES = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                         ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
OPEN_CLIP_TOP_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                       "positional_embedding": "embeddings.position_embedding.weight",
                       "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def is_single_file(name_or_path) -> bool:
    return str(name_or_path).endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def check_single_file(path, model_config) -> None:
    """Everything a single-file base needs, checked before any weights are read."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: only .safetensors model files are loaded (never pickle checkpoints)")
    if not path.is_file():
        raise UserInputError(f"model file not found: {path}")
    if not model_config:
        raise UserInputError(
            f"{path.name} is a single-file model: name a diffusers folder of the same architecture with "
            "--model_config DIR (e.g. a download of stabilityai/stable-diffusion-xl-base-1.0; its configs and "
            "tokenizers are used, not its weights)")
    missing = [part for part in CONFIG_PARTS if not (Path(model_config).expanduser() / part).is_dir()]
    if missing:
        raise UserInputError(f"--model_config {model_config} is not a diffusers SDXL folder: it has no "
                             f"{', '.join(missing)}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            has_unet = any(key.startswith(UNET_PREFIX) for key in handle.keys())
    except SafetensorError as error:
        raise UserInputError(f"{path} is not a readable safetensors file ({error})") from None
    if not has_unet:
        raise UserInputError(f"{path} is not an SDXL checkpoint in the original layout (no {UNET_PREFIX}* weights)")


def base_model_sha256(name_or_path) -> str | None:
    """The content hash of a single-file base (None for folders and hub ids), recorded in adapters so that another
    base is caught. Hashing SDXL's 6.9 GB takes seconds, so it is done once per file and process."""
    if not is_single_file(name_or_path):
        return None
    stat = os.stat(name_or_path)
    return _sha256(str(Path(name_or_path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, modified: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_base(adapter_sha256: str | None, name_or_path, adapter) -> None:
    """An adapter (or checkpoint) trained on one single file, used with another, is one clear error."""
    sha256 = base_model_sha256(name_or_path)
    if adapter_sha256 and sha256 and adapter_sha256 != sha256:
        raise UserInputError(f"{adapter} was trained on a base model file with sha256 {adapter_sha256[:12]}…, but "
                             f"{name_or_path} has sha256 {sha256[:12]}…: another model")


def load_single_file_components(path, model_config, dtype: torch.dtype = torch.float32, vae=None,
                                vae_dtype: torch.dtype | None = None) -> dict:
    """unet, vae, both text encoders and both tokenizers, as StableDiffusionXLPipeline takes them; `vae` replaces
    the file's own (an fp16-safe one), which is then not read. The file's VAE is read in `vae_dtype` (default
    `dtype`)."""
    check_single_file(path, model_config)
    path, model_config = str(Path(path).expanduser()), str(Path(model_config).expanduser())
    common = {"config": model_config, "local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_single_file(path, subfolder="unet", **common)
        vae = vae or AutoencoderKL.from_single_file(path, subfolder="vae", **{**common, "torch_dtype": vae_dtype or dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserInputError(f"could not read the UNet and VAE of {path}: {str(error).splitlines()[0]}") from None
    with safe_open(path, framework="pt") as handle:
        clip_l = {k[len(CLIP_L_PREFIX):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(CLIP_L_PREFIX)}
        open_clip = {k[len(OPEN_CLIP_PREFIX):]: handle.get_tensor(k) for k in handle.keys()
                     if k.startswith(OPEN_CLIP_PREFIX)}
    text_encoder = _text_encoder(CLIPTextModel, model_config, "text_encoder", clip_l, path)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, model_config, "text_encoder_2",
                                   open_clip_to_transformers(open_clip), path)
    tokenizers = [CLIPTokenizer.from_pretrained(model_config, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.to(dtype), "text_encoder_2": text_encoder_2.to(dtype),
            "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1]}


def open_clip_to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names (fused q/k/v, a projection applied on the right) as transformers' CLIP names them."""
    converted = {}
    for name, tensor in weights.items():
        if name in OPEN_CLIP_TOP_NAMES:
            converted[OPEN_CLIP_TOP_NAMES[name]] = tensor
        elif name == "text_projection":
            converted["text_projection.weight"] = tensor.T.contiguous()
        elif name.startswith("transformer.resblocks."):
            index, _, rest = name[len("transformer.resblocks."):].partition(".")
            layer = f"encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for projection, part in zip("qkv", tensor.chunk(3)):
                    converted[f"{layer}self_attn.{projection}_proj.{kind}"] = part.contiguous()
                continue
            for original, renamed in OPEN_CLIP_LAYER_NAMES:
                if rest.startswith(original):
                    converted[layer + renamed + rest[len(original):]] = tensor
    return converted


def _text_encoder(model_class, model_config: str, subfolder: str, weights: dict, path: str) -> PreTrainedModel:
    """The encoder built from its config and given exactly the file's weights: a missing one is an error, not a
    random layer. Built with empty weights (buffers such as position_ids stay real), since random init of what the
    file replaces costs seconds. Files name layers with or without `text_model.`; the model's own naming decides."""
    with init_empty_weights(include_buffers=False):
        model = model_class(CLIPTextConfig.from_pretrained(model_config, subfolder=subfolder))
    expected = model.state_dict()
    state = {}
    for name, tensor in weights.items():
        bare = name.removeprefix("text_model.")
        for candidate in (bare, "text_model." + bare):
            if candidate in expected:
                state[candidate] = tensor
    missing = sorted(set(expected) - set(state) - {k for k in expected if k.endswith("position_ids")})
    if missing:
        raise UserInputError(f"{path} has no weights for {subfolder}.{missing[0]} ({len(missing)} missing): not an "
                             f"SDXL checkpoint, or --model_config {model_config} is another architecture")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise UserInputError(f"{path}: {subfolder}.{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file but "
                             f"{tuple(expected[wrong[0]].shape)} in --model_config {model_config}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval()
