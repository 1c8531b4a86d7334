"""Adapter files: the native MoSLoRA file and its two plain-LoRA exports. The key schema lives here, once.

- native `moslora.safetensors`: `<component>.<module>.lora_A.weight` (r×in), `.lora_mixer.weight` (r×r, absent
  for mixer_init none), `.lora_B.weight` (out×r); metadata holds the format, version, configs and base model.
- diffusers `pytorch_lora_weights.safetensors`: `<component>.<module>.lora_A.weight` and `.lora_B.weight` with
  the mixer and scale folded into B (B' = s·B·M), which stock `load_lora_weights` reads with alpha = rank.
- kohya `lora_kohya.safetensors`: `lora_unet_<SGM path>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (`lora_te1_` / `lora_te2_` for the text encoders), read by A1111, ComfyUI and kohya's sd-scripts.
- a learned trigger embedding: `trigger.text_encoder` / `trigger.text_encoder_2` in the native file (metadata
  `trigger_token`), exported as `trigger_embedding.safetensors` with `clip_l` / `clip_g` (1×width each), SDXL's
  textual-inversion layout that A1111 and ComfyUI read and diffusers' `load_textual_inversion` takes.
Components are `unet`, `text_encoder`, `text_encoder_2`, as named on a diffusers SDXL pipeline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MoSLoRAConfig
from .errors import AdapterFileError
from .files import write_atomically
from .functional import fold_mixer, low_rank_svd, truncate_lora
from .inject import (
    find_target_linears,
    fuse_moslora,
    inject_moslora,
    moslora_config,
    moslora_layers,
    set_moslora_scale,
)
from .trigger import install_trigger_embedding, trigger_embedding

FORMAT_NAME = "moslora"
FORMAT_VERSION = "1"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
NATIVE_FILE = "moslora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
TRIGGER_FILE = "trigger_embedding.safetensors"
TRIGGER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
"""The linear layers of the UNet's attention blocks: the only UNet modules kohya's SGM names reach."""
_PARTS = {"lora_A": "lora_A.weight", "lora_mixer": "lora_mixer.weight", "lora_B": "lora_B.weight"}
_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_mixer|lora_B)\.weight$")


@dataclass
class ModuleAdapter:
    lora_A: torch.Tensor
    lora_mixer: torch.Tensor | None
    lora_B: torch.Tensor


@dataclass
class NativeAdapter:
    """A native file in memory: per component, its config and its adapted modules."""

    configs: dict[str, MoSLoRAConfig]
    modules: dict[str, dict[str, ModuleAdapter]]
    base_model: str | None
    unet_layers_per_block: list[int] | None
    base_model_sha256: str | None = None
    """The content hash of the single file it was trained on (None for a diffusers folder or hub id)."""
    trigger_token: str | None = None
    trigger_vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The learned trigger embedding per text encoder, when it was trained."""

    def folded(self, component: str, rank: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module → (down, up): the exact plain LoRA of each MoSLoRA module, or its best rank-`rank` one."""
        scaling = self.configs[component].scaling
        pairs = {
            name: fold_mixer(m.lora_A, m.lora_mixer, m.lora_B, scaling)
            for name, m in self.modules[component].items()
        }
        if rank is None or rank >= self.configs[component].rank:
            return pairs
        return {name: truncate_lora(down, up, rank) for name, (down, up) in pairs.items()}

    def compression_error(self, rank: int) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over all modules: what truncating to rank k loses."""
        lost = total = 0.0
        for component in self.configs:
            for down, up in self.folded(component).values():
                singular_values = low_rank_svd(down, up)[1] ** 2
                lost += singular_values[rank:].sum().item()
                total += singular_values.sum().item()
        return (lost / total) ** 0.5 if total else 0.0


def write_safetensors(tensors: dict, path, metadata: dict[str, str]) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_moslora(path, unet, text_encoder=None, text_encoder_2=None, base_model: str | None = None,
                 base_model_sha256: str | None = None) -> Path:
    """Write the native file of whichever models carry MoSLoRA layers (the mixer kept, for resuming)."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    tensors, configs = {}, {}
    for component, model in models.items():
        layers = moslora_layers(model) if model is not None else {}
        if not layers:
            continue
        configs[component] = moslora_config(model).to_dict()
        for name, layer in layers.items():
            for part, suffix in _PARTS.items():
                tensor = getattr(layer, part)
                if tensor is not None:
                    tensors[f"{component}.{_file_module_name(model, name)}.{suffix}"] = tensor
    if "unet" not in configs:
        raise ValueError("the UNet has no MoSLoRA layers to save; call inject_moslora first")
    triggers = {c: trigger_embedding(models[c]) for c in TRIGGER_KEYS}
    for component, trigger in triggers.items():
        if trigger is not None:
            tensors[f"trigger.{component}"] = trigger.vector
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "configs": json.dumps(configs),
        "base_model": base_model or "",
        "base_model_sha256": base_model_sha256 or "",
        "unet_layers_per_block": json.dumps(unet_layers_per_block(unet.config)) if hasattr(unet, "config") else "",
        "trigger_token": next((t.token for t in triggers.values() if t is not None), ""),
    }
    return write_safetensors(tensors, path, metadata)


def read_moslora(path) -> NativeAdapter:
    """Read and check a native file; every problem is an AdapterFileError that names it."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            if metadata.get("format") != FORMAT_NAME:
                raise AdapterFileError(_not_native_message(path, keys))
            tensors = {key: handle.get_tensor(key) for key in keys}
    except SafetensorError as error:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} is MoSLoRA format version {metadata.get('format_version')!r}; "
            f"this version of dreambooth_moslora reads version {FORMAT_VERSION}"
        )
    try:
        configs = {c: MoSLoRAConfig.from_dict(v) for c, v in json.loads(metadata["configs"]).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterFileError(f"{path} has an unreadable MoSLoRA config in its metadata ({error})") from None
    trigger_token = metadata.get("trigger_token") or None
    trigger_vectors = {key.split(".", 1)[1]: tensors.pop(key) for key in list(tensors) if key.startswith("trigger.")}
    if bool(trigger_token) != bool(trigger_vectors) or not set(trigger_vectors) <= set(TRIGGER_KEYS):
        raise AdapterFileError(f"{path} has an incomplete trigger embedding (token {trigger_token!r}, "
                               f"vectors for {sorted(trigger_vectors)})")
    modules = _group_modules(path, tensors, configs)
    layers_per_block = metadata.get("unet_layers_per_block")
    return NativeAdapter(
        configs=configs,
        modules=modules,
        base_model=metadata.get("base_model") or None,
        unet_layers_per_block=json.loads(layers_per_block) if layers_per_block else None,
        base_model_sha256=metadata.get("base_model_sha256") or None,
        trigger_token=trigger_token,
        trigger_vectors=trigger_vectors,
    )


def _not_native_message(path, keys) -> str:
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        kind = "a kohya-style LoRA"
    elif any(".lora_A." in k or ".lora.down." in k for k in keys):
        kind = "a diffusers/PEFT LoRA"
    else:
        kind = "not a LoRA file"
    return (
        f"{path} is not a native MoSLoRA file (no 'format: {FORMAT_NAME}' in its metadata; it looks like {kind}). "
        "Plain LoRA files load with diffusers' pipe.load_lora_weights."
    )


def _group_modules(path, tensors, configs) -> dict[str, dict[str, ModuleAdapter]]:
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in configs}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match or match.group(1) not in configs:
            raise AdapterFileError(f"{path} has an unexpected key {key!r}")
        component, module, part = match.groups()
        parts[component].setdefault(module, {})[part] = tensor
    modules = {}
    for component, config in configs.items():
        modules[component] = {}
        for module, found in parts[component].items():
            wanted = {"lora_A", "lora_B"} | ({"lora_mixer"} if config.has_mixer else set())
            if set(found) != wanted:
                raise AdapterFileError(
                    f"{path}: {component}.{module} has {sorted(found)}, expected {sorted(wanted)}"
                )
            adapter = ModuleAdapter(found["lora_A"], found.get("lora_mixer"), found["lora_B"])
            rank = config.rank
            if (
                adapter.lora_A.ndim != 2
                or adapter.lora_A.shape[0] != rank
                or adapter.lora_B.ndim != 2
                or adapter.lora_B.shape[1] != rank
                or (adapter.lora_mixer is not None and tuple(adapter.lora_mixer.shape) != (rank, rank))
            ):
                raise AdapterFileError(f"{path}: {component}.{module} has shapes that do not fit rank {rank}")
            modules[component][module] = adapter
        if not modules[component]:
            raise AdapterFileError(f"{path} has a config for {component} but no weights for it")
    return modules


def load_moslora(pipe, path, scale: float = 1.0, fuse: bool = False) -> dict[str, list[str]]:
    """Attach a native file to a diffusers SDXL pipeline; returns the adapted module names per component.

    With fuse, the updates are merged into the weights and the wrappers dropped: sampling at the base model's
    speed, not reversible. The whole file is checked against the pipeline first, so a wrong file leaves the
    pipeline untouched.
    """
    adapter = read_moslora(path)
    components = {}
    for component, config in adapter.configs.items():
        model = getattr(pipe, component, None)
        if model is None:
            raise AdapterFileError(f"{path} adapts {component}, which this pipeline does not have")
        if moslora_layers(model):
            raise AdapterFileError(f"the pipeline's {component} already has a MoSLoRA adapter")
        linears = find_target_linears(model, config.target_modules)
        _check_fits(path, component, adapter.modules[component], {_file_module_name(model, n): m for n, m in linears.items()})
        components[component] = model
    triggers = _trigger_targets(pipe, path, adapter)
    loaded = {}
    for component, model in components.items():
        weights = next(model.parameters())
        loaded[component] = inject_moslora(model, adapter.configs[component], dtype=weights.dtype)
        copy_adapter_weights(model, adapter.modules[component])
        set_moslora_scale(model, scale)
        if fuse:
            fuse_moslora(model)
    for encoder, token_id, vector in triggers:
        install_trigger_embedding(encoder, adapter.trigger_token, token_id, vector)
    return loaded


def _trigger_targets(pipe, path, adapter: NativeAdapter) -> list[tuple]:
    """(text encoder, token id, vector) for each learned trigger vector, checked against the pipeline."""
    targets = []
    for component, vector in adapter.trigger_vectors.items():
        encoder = getattr(pipe, component, None)
        tokenizer = getattr(pipe, {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}[component], None)
        if encoder is None or tokenizer is None:
            raise AdapterFileError(f"{path} has a trigger embedding for {component}, which this pipeline does not have")
        if trigger_embedding(encoder) is not None:
            raise AdapterFileError(f"the pipeline's {component} already has a learned trigger embedding")
        token_id = tokenizer.get_vocab().get(adapter.trigger_token)
        width = encoder.get_input_embeddings().embedding_dim
        if token_id is None or vector.shape != (width,):
            raise AdapterFileError(
                f"{path}: the trigger embedding ({adapter.trigger_token!r}, width {vector.shape[-1]}) does not fit "
                f"this pipeline's {component} (width {width}); the adapter was trained on another base model"
            )
        targets.append((encoder, token_id, vector.to(encoder.device)))
    return targets


@torch.no_grad()
def copy_adapter_weights(model, modules: dict[str, ModuleAdapter]):
    """Put a file's weights into a model's MoSLoRA layers (same config, checked by the caller)."""
    for name, layer in moslora_layers(model).items():
        module = modules[_file_module_name(model, name)]
        for part in _PARTS:
            tensor = getattr(module, part)
            if tensor is not None:
                getattr(layer, part).copy_(tensor)


def _file_module_name(model, name: str) -> str:
    """Files name CLIP layers `text_model.encoder…` as every LoRA tool expects; transformers 5's CLIPTextModel
    dropped that level, so it is put back here (and diffusers strips it again when loading)."""
    from transformers import PreTrainedModel  # here: `inspect` and `export` need no transformers

    if isinstance(model, PreTrainedModel) and not hasattr(model, "text_model") and not name.startswith("text_model."):
        return "text_model." + name
    return name


def _check_fits(path, component, modules, linears):
    for name in sorted(set(modules) | set(linears)):
        if name not in linears:
            raise AdapterFileError(
                f"{path}: {component}.{name} is not a target layer of this pipeline; "
                "the adapter was trained on another base model"
            )
        if name not in modules:
            raise AdapterFileError(f"{path} is missing weights for {component}.{name}")
        linear, module = linears[name], modules[name]
        if module.lora_A.shape[1] != linear.in_features or module.lora_B.shape[0] != linear.out_features:
            raise AdapterFileError(
                f"{path}: {component}.{name} is {module.lora_A.shape[1]}→{module.lora_B.shape[0]} in the adapter "
                f"but {linear.in_features}→{linear.out_features} in this pipeline; "
                "the adapter was trained on another base model"
            )


def export_diffusers(native_path, out_path, rank: int | None = None) -> Path:
    """The folded plain LoRA that stock `pipe.load_lora_weights(dir)` reads (PEFT key names).

    With `rank`, each update is re-compressed by truncated SVD to at most that rank.
    """
    adapter = read_moslora(native_path)
    tensors = {}
    for component in adapter.configs:
        for name, (down, up) in adapter.folded(component, rank).items():
            tensors[f"{component}.{name}.lora_A.weight"] = down
            tensors[f"{component}.{name}.lora_B.weight"] = up
    return write_safetensors(tensors, out_path, {"format": "pt", **_provenance(adapter)})


def export_trigger_embedding(native_path, out_path) -> Path:
    """The learned trigger as an SDXL textual-inversion file (clip_l, clip_g), for A1111, ComfyUI and diffusers."""
    adapter = read_moslora(native_path)
    if not adapter.trigger_vectors:
        raise AdapterFileError(f"{native_path} has no learned trigger embedding (train with --train_trigger_embedding)")
    tensors = {TRIGGER_KEYS[c]: v[None] for c, v in adapter.trigger_vectors.items()}
    return write_safetensors(tensors, out_path, {"trigger_token": adapter.trigger_token, **_provenance(adapter)})


def export_kohya(native_path, out_path, rank: int | None = None) -> Path:
    """The folded plain LoRA in kohya's SDXL naming, for A1111, ComfyUI and kohya's tools (`rank` as above)."""
    adapter = read_moslora(native_path)
    tensors = {}
    for component in adapter.configs:
        for name, (down, up) in adapter.folded(component, rank).items():
            key = kohya_module_name(component, name, adapter.unet_layers_per_block)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: s is folded into up
    unet_rank = min(rank or adapter.configs["unet"].rank, adapter.configs["unet"].rank)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet_rank),
        "ss_network_alpha": str(unet_rank),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": adapter.base_model or "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": Path(out_path).stem,
        **_provenance(adapter),
    }
    return write_safetensors(tensors, out_path, metadata)


def _provenance(adapter: NativeAdapter) -> dict[str, str]:
    return {
        "moslora_configs": json.dumps({c: v.to_dict() for c, v in adapter.configs.items()}),
        "moslora_base_model": adapter.base_model or "",
    }


def kohya_exportable(target: str) -> bool:
    """Whether a UNet target (a module name or a suffix of one, as inject matches them) lies in an attention block,
    so the kohya export can name what it wraps."""
    return any(t == target or t.endswith("." + target) or target.endswith("." + t) for t in KOHYA_UNET_MODULES)


def unet_layers_per_block(unet_config) -> list[int]:
    layers = unet_config.layers_per_block
    count = len(unet_config.down_block_types)
    return [int(layers)] * count if isinstance(layers, int) else [int(n) for n in layers]


def kohya_module_name(component: str, module: str, layers_per_block: list[int] | None) -> str:
    """diffusers module path → kohya name, mapping UNet blocks to SGM's input/middle/output_blocks."""
    if component != "unet":
        return KOHYA_PREFIXES[component] + module.replace(".", "_")
    if layers_per_block is None:
        raise AdapterFileError("the native file does not record the UNet's layers_per_block; re-save it")
    sgm = _sgm_unet_path(module, layers_per_block)
    return KOHYA_PREFIXES["unet"] + sgm.replace(".", "_")


def _sgm_unet_path(module: str, layers_per_block: list[int]) -> str:
    """SGM numbering: input block 0 is conv_in, each down block adds its layers and a downsampler;
    each up block has one layer more than its down twin (reversed order)."""
    parts = module.split(".")
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            index = 1 + sum(n + 1 for n in layers_per_block[:block]) + layer
            name = "input_blocks"
        else:
            index = sum(n + 1 for n in list(reversed(layers_per_block))[:block]) + layer
            name = "output_blocks"
        return ".".join([name, str(index), "1", *parts[4:]])
    raise AdapterFileError(f"kohya export maps UNet attention modules only ({', '.join(KOHYA_UNET_MODULES)}); "
                           f"{module} is not one")
