"""DreamBooth for SDXL with MoSLoRA adapters, exported as plain LoRAs that every SDXL tool loads.

The public names are imported on first use, so `inspect` and `export` start without loading diffusers."""

import importlib

from .feedback import silence_harmless_dependency_warnings

silence_harmless_dependency_warnings()  # before diffusers and transformers are imported

_MODULE_OF = {
    "MoSLoRAConfig": "config",
    "MoSLoRALinear": "layer",
    "AdapterFileError": "errors", "ConfigError": "errors", "UserInputError": "errors",
    "fuse_moslora": "inject", "inject_moslora": "inject", "merge_moslora": "inject", "moslora_disabled": "inject",
    "moslora_parameters": "inject", "remove_moslora": "inject", "set_moslora_scale": "inject",
    "unmerge_moslora": "inject",
    "load_adapter": "adapters",
    "evaluate_adapters": "evaluate",
    "GenerationSettings": "generate", "generate_images": "generate", "load_pipeline": "generate",
    "export_diffusers": "io", "export_kohya": "io", "load_moslora": "io", "read_moslora": "io", "save_moslora": "io",
    "format_report": "inspection", "inspect_adapter": "inspection",
    "save_tiny_sdxl_pipeline": "tiny",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
