"""DreamBooth for SDXL with MoSLoRA adapters, exported as plain LoRAs that every SDXL tool loads."""

from .feedback import silence_harmless_dependency_warnings

silence_harmless_dependency_warnings()  # before diffusers and transformers are imported

from .config import MoSLoRAConfig  # noqa: E402
from .inject import (
    fuse_moslora,
    inject_moslora,
    merge_moslora,
    moslora_disabled,
    moslora_parameters,
    remove_moslora,
    set_moslora_scale,
    unmerge_moslora,
)
from .adapters import load_adapter
from .errors import AdapterFileError, ConfigError, UserInputError
from .evaluate import evaluate_adapters
from .generate import GenerationSettings, generate_images, load_pipeline
from .io import export_diffusers, export_kohya, load_moslora, read_moslora, save_moslora
from .inspection import format_report, inspect_adapter
from .layer import MoSLoRALinear
from .tiny import save_tiny_sdxl_pipeline

__all__ = [
    "GenerationSettings",
    "evaluate_adapters",
    "format_report",
    "generate_images",
    "inspect_adapter",
    "load_adapter",
    "load_pipeline",
    "AdapterFileError",
    "ConfigError",
    "UserInputError",
    "export_diffusers",
    "export_kohya",
    "load_moslora",
    "read_moslora",
    "save_moslora",
    "save_tiny_sdxl_pipeline",
    "MoSLoRAConfig",
    "MoSLoRALinear",
    "inject_moslora",
    "fuse_moslora",
    "merge_moslora",
    "moslora_disabled",
    "moslora_parameters",
    "remove_moslora",
    "set_moslora_scale",
    "unmerge_moslora",
]
