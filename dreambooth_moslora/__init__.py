"""DreamBooth for SDXL with MoSLoRA adapters, exported as plain LoRAs that every SDXL tool loads."""

from .config import MoSLoRAConfig
from .inject import (
    inject_moslora,
    merge_moslora,
    moslora_parameters,
    remove_moslora,
    set_moslora_scale,
    unmerge_moslora,
)
from .errors import AdapterFileError, ConfigError, UserInputError
from .io import export_diffusers, export_kohya, load_moslora, read_moslora, save_moslora
from .layer import MoSLoRALinear
from .tiny import save_tiny_sdxl_pipeline

__all__ = [
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
    "merge_moslora",
    "moslora_parameters",
    "remove_moslora",
    "set_moslora_scale",
    "unmerge_moslora",
]
