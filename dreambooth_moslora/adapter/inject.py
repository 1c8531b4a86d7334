"""Put MoSLoRA into any nn.Module and take it out again: inject, merge, unmerge, remove."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import MoSLoRAConfig
from .errors import ConfigError
from .layer import MoSLoRALinear


def find_target_linears(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """The nn.Linear layers whose qualified name equals a target or ends with '.' + target."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, MoSLoRALinear)
        and any(name == t or name.endswith("." + t) for t in target_modules)
    }


def moslora_layers(model: nn.Module) -> dict[str, MoSLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoSLoRALinear)}


def moslora_config(model: nn.Module) -> MoSLoRAConfig:
    """The config the model's adapter was injected with (one per model)."""
    layers = moslora_layers(model)
    if not layers:
        raise ValueError("this model has no MoSLoRA layers; call inject_moslora first")
    return next(iter(layers.values())).config


def inject_moslora(model: nn.Module, config: MoSLoRAConfig, dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap every target linear layer and freeze the model's own weights; returns the wrapped names.

    Adapter weights are `dtype` (fp32 by default, also over a fp16/bf16 base); outputs keep the base dtype.
    """
    if moslora_layers(model):
        raise ValueError("this model already has MoSLoRA layers; call remove_moslora first")
    targets = find_target_linears(model, config.target_modules)
    if not targets:
        raise ConfigError(
            f"no nn.Linear in the model matches target_modules {list(config.target_modules)}"
        )
    model.requires_grad_(False)
    for name, linear in targets.items():
        _set_submodule(model, name, MoSLoRALinear(linear, config, dtype=dtype))
    return list(targets)


def moslora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, in a stable order (A, mixer, B per layer); a frozen mixer is left out."""
    params = []
    for layer in moslora_layers(model).values():
        params += [p for p in (layer.lora_A, layer.lora_mixer, layer.lora_B) if p is not None and p.requires_grad]
    return params


def set_moslora_scale(model: nn.Module, scale: float):
    """Multiply every adapter's update by `scale` (0 turns it off); refuses while merged."""
    for layer in moslora_layers(model).values():
        if layer.merged:
            raise ValueError("unmerge the adapter before changing its scale")
        layer.scale = float(scale)


@contextmanager
def moslora_disabled(model: nn.Module):
    """The base model inside the block (every update scaled by 0), the adapter's own scales again after it."""
    layers = list(moslora_layers(model).values())
    scales = [layer.scale for layer in layers]
    set_moslora_scale(model, 0.0)
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def merge_moslora(model: nn.Module):
    """Fold every ΔW into its base weight, for sampling at the base model's speed."""
    for layer in moslora_layers(model).values():
        layer.merge()


def fuse_moslora(model: nn.Module) -> nn.Module:
    """Merge every ΔW and drop the wrappers: the model is the base architecture again, at its speed exactly.

    Not reversible (unlike merge_moslora); for sampling only.
    """
    for name, layer in moslora_layers(model).items():
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    return model


def unmerge_moslora(model: nn.Module):
    for layer in moslora_layers(model).values():
        layer.unmerge()


def remove_moslora(model: nn.Module) -> nn.Module:
    """Put the original layers back (unmerging first), so state-dict keys are the base model's again."""
    for name, layer in moslora_layers(model).items():
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
