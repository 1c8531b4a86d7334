"""What an adapter file holds: format, base model, settings, size, and the spectrum of each module's update."""

from __future__ import annotations

import json
import math

import torch

from ..adapter.adapters import read_update_factors, resolve_adapter_file
from ..adapter.functional import low_rank_svd

TOP_SINGULAR_VALUES = 4


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 for a rank-one update,
    r when r directions carry equal weight."""
    weights = singular_values / singular_values.sum()
    weights = weights[weights > 0]
    return math.exp(-(weights * weights.log()).sum().item()) if len(weights) else 0.0


def inspect_adapter(path) -> dict:
    path = resolve_adapter_file(path)
    kind, factors, metadata = read_update_factors(path)
    modules = {}
    for name, (down, up) in factors.items():
        singular_values = low_rank_svd(down, up)[1]
        modules[name] = {
            "rank": down.shape[0],
            "effective_rank": round(effective_rank(singular_values), 3),
            "top_singular_values": [round(v, 6) for v in singular_values[:TOP_SINGULAR_VALUES].tolist()],
        }
    configs = json.loads(metadata.get("configs") or metadata.get("moslora_configs") or "{}")
    components = sorted({name.split(".")[0] if kind != "kohya" else name.split("_")[1] for name in factors})
    return {
        "file": str(path),
        "format": kind,
        "base_model": metadata.get("base_model") or metadata.get("moslora_base_model") or None,
        "base_model_sha256": metadata.get("base_model_sha256") or None,
        "components": components,
        "configs": configs,
        "parameters": sum(d.numel() + u.numel() for d, u in factors.values())
        + (_mixer_parameters(configs, factors) if kind == "native" else 0),
        "file_bytes": path.stat().st_size,
        "trigger_token": metadata.get("trigger_token") or None,
        "modules": modules,
    }


def _mixer_parameters(configs, factors) -> int:
    return sum(configs[name.split(".")[0]]["rank"] ** 2 for name in factors
               if configs[name.split(".")[0]]["mixer_init"] != "none")


def format_report(report: dict) -> str:
    """The human-readable form of `inspect_adapter`'s report."""
    lines = [f"file        {report['file']} ({report['file_bytes'] / 2**20:.2f} MiB)",
             f"format      {report['format']}",
             f"base model  {report['base_model'] or 'unknown'}"
             + (f" (sha256 {report['base_model_sha256']})" if report["base_model_sha256"] else ""),
             f"components  {', '.join(report['components'])}",
             f"parameters  {report['parameters']:,}"]
    if report["trigger_token"]:
        lines.append(f"trigger     {report['trigger_token']} (its embedding learned, in both text encoders)")
    for component, config in report["configs"].items():
        lines.append(f"{component:<11} rank {config['rank']}, alpha {config['alpha']:g}, mixer {config['mixer_init']}, "
                     f"targets {','.join(config['target_modules'])}")
    ranks = [m["effective_rank"] for m in report["modules"].values()]
    lines.append(f"modules     {len(ranks)}, effective rank of ΔW: mean {sum(ranks) / len(ranks):.2f}, "
                 f"min {min(ranks):.2f}, max {max(ranks):.2f}")
    lines.append("")
    lines.append(f"{'module':<80} {'eff.rank':>8}  top singular values")
    for name, module in report["modules"].items():
        values = " ".join(f"{v:.3g}" for v in module["top_singular_values"])
        lines.append(f"{name:<80} {module['effective_rank']:>8.2f}  {values}")
    return "\n".join(lines)
