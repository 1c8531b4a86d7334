"""DreamBooth for SDXL with MoSLoRA adapters, exported as plain LoRAs that every SDXL tool loads.

The public names are imported on first use, so `inspect` and `export` start without loading diffusers."""

import importlib

from .adapter.feedback import silence_harmless_dependency_warnings

silence_harmless_dependency_warnings()  # before diffusers and transformers are imported

_MODULE_OF = {
    # the adapter library
    "MoSLoRAConfig": "adapter.config",
    "MoSLoRALinear": "adapter.layer",
    "AdapterFileError": "adapter.errors", "ConfigError": "adapter.errors", "UserInputError": "adapter.errors",
    "fuse_moslora": "adapter.inject", "inject_moslora": "adapter.inject", "merge_moslora": "adapter.inject",
    "moslora_disabled": "adapter.inject", "moslora_parameters": "adapter.inject", "remove_moslora": "adapter.inject",
    "set_moslora_scale": "adapter.inject", "unmerge_moslora": "adapter.inject",
    "load_adapter": "adapter.adapters",
    "export_diffusers": "adapter.io", "export_kohya": "adapter.io", "load_moslora": "adapter.io",
    "read_moslora": "adapter.io", "save_moslora": "adapter.io",
    # SDXL pipelines: generating, the tiny stand-in
    "GenerationSettings": "pipeline.generate", "generate_images": "pipeline.generate",
    "load_pipeline": "pipeline.generate",
    "save_tiny_sdxl_pipeline": "pipeline.tiny",
    # the verbs
    "evaluate_adapters": "verbs.evaluate",
    "format_report": "verbs.inspection", "inspect_adapter": "verbs.inspection",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
