"""Any adapter a user points at: an output folder or one of its three files, in whichever format it is."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import AdapterFileError
from .io import DIFFUSERS_FILE, FORMAT_NAME, KOHYA_FILE, NATIVE_FILE, load_moslora, read_moslora

def resolve_adapter_file(path) -> Path:
    """A folder means its native file, else its diffusers file, else its kohya file."""
    path = Path(path)
    if path.is_dir():
        for name in (NATIVE_FILE, DIFFUSERS_FILE, KOHYA_FILE):
            if (path / name).is_file():
                return path / name
        raise AdapterFileError(f"{path} holds no adapter file ({NATIVE_FILE}, {DIFFUSERS_FILE} or {KOHYA_FILE})")
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    return path


def _header(path) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({error})") from None


def detect_format(path) -> str:
    """native (our metadata), kohya (lora_down/lora_up keys) or diffusers (lora_A/lora_B keys)."""
    return _format(path, *_header(path))


def _format(path, metadata, keys) -> str:
    if metadata.get("format") == FORMAT_NAME:
        return "native"
    if keys and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys):
        return "kohya"
    if keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    raise AdapterFileError(f"{path} is not a LoRA or MoSLoRA adapter file (its keys are neither format's)")


def load_adapter(pipe, path, scale: float = 1.0, fuse: bool = False) -> str:
    """Attach any of our files to an SDXL pipeline (plain LoRAs through diffusers itself); returns the format."""
    path = resolve_adapter_file(path)
    kind = detect_format(path)
    if kind == "native":
        load_moslora(pipe, path, scale=scale, fuse=fuse)
        return kind
    if kind == "diffusers":
        _check_diffusers_lora_fits(pipe, path)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="adapter")
    except (RuntimeError, ValueError, KeyError) as error:
        pipe.unload_lora_weights()
        first_line = str(error).strip().splitlines()[-1][:300]
        raise AdapterFileError(
            f"{path} does not fit this pipeline (trained on another base model?): {first_line}"
        ) from None
    if fuse:
        pipe.fuse_lora(lora_scale=scale)
    else:
        pipe.set_adapters(["adapter"], adapter_weights=[scale])
    return kind


def _check_diffusers_lora_fits(pipe, path):
    """Shapes checked before diffusers touches the pipeline, so a file for another base is refused without being
    half loaded and unloaded again. Names diffusers maps on loading are left to it."""
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            component, _, rest = key.partition(".")
            module_name, _, part = rest.rpartition(".lora_")
            module = _submodule(getattr(pipe, component, None), module_name)
            if not isinstance(module, torch.nn.Linear):
                continue
            shape = handle.get_slice(key).get_shape()
            wanted, got = ((module.in_features, shape[1]) if part == "A.weight" else (module.out_features, shape[0]))
            if wanted != got:
                raise AdapterFileError(f"{path} does not fit this pipeline (trained on another base model?): "
                                       f"{component}.{module_name} is {wanted} wide here, {got} in the file")


def _submodule(model, name: str):
    try:
        return model.get_submodule(name) if model is not None else None
    except AttributeError:
        return None


def recorded_base_sha256(path) -> str | None:
    """The single-file base a native adapter was trained on (its content hash, from the header alone); None when
    not recorded."""
    path = resolve_adapter_file(path)
    metadata, keys = _header(path)
    return (metadata.get("base_model_sha256") or None) if _format(path, metadata, keys) == "native" else None


def read_update_factors(path) -> tuple[str, dict[str, tuple], dict[str, str]]:
    """(format, {module: (down, up)} with ΔW = up·down, metadata) for any of the three formats."""
    metadata, keys = _header(path)
    kind = _format(path, metadata, keys)
    if kind == "native":
        adapter = read_moslora(path)
        factors = {f"{component}.{name}": pair for component in adapter.configs
                   for name, pair in adapter.folded(component).items()}
        return kind, factors, metadata
    tensors = load_file(str(path))
    down_suffix, up_suffix = (".lora_down.weight", ".lora_up.weight") if kind == "kohya" else (
        ".lora_A.weight", ".lora_B.weight")
    factors = {}
    for key, down in tensors.items():
        if key.endswith(down_suffix):
            name = key[: -len(down_suffix)]
            up = tensors.get(name + up_suffix)
            if up is None:
                raise AdapterFileError(f"{path}: {name} has no {up_suffix.strip('.')}")
            alpha = tensors.get(f"{name}.alpha")
            scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
            factors[name] = (down.float(), up.float() * scale)
    return kind, factors, metadata
