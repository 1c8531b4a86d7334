"""Pure MoSLoRA math: ΔW = s·B·M·A (Wu et al. 2024, arXiv 2406.11909).

Every weight-space operation (merge, unmerge, every export) goes through `fold_mixer`, so the mixer can
never be forgotten on one path and kept on another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fold_mixer(lora_A, lora_mixer, lora_B, scaling: float):
    """(A, s·B·M): an ordinary LoRA pair whose product is exactly the MoSLoRA update."""
    up = lora_B if lora_mixer is None else lora_B @ lora_mixer  # (out, r)
    return lora_A, scaling * up


def delta_weight(lora_A, lora_mixer, lora_B, scaling: float) -> torch.Tensor:
    """The dense update ΔW (out×in). Only for merging and analysis, never in the training forward."""
    down, up = fold_mixer(lora_A, lora_mixer, lora_B, scaling)
    return up @ down


def low_rank_forward(x, lora_A, lora_mixer, lora_B, scaling: float) -> torch.Tensor:
    """ΔW·x without forming ΔW, as x·(s·M·A)ᵀ·Bᵀ.

    Mixing first costs r²·in per call instead of r² per token, and keeps one r×in matrix for backward where
    (x·Aᵀ)·Mᵀ keeps a (..., r) tensor; benchmarks/run.py measures both.
    """
    down = lora_A
    if lora_mixer is not None and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: plans
        with torch.autocast(x.device.type, enabled=False):  # a tiny product: keep it in the adapter's dtype
            down = lora_mixer @ lora_A  # (r, in)
    elif lora_mixer is not None:
        down = lora_mixer @ lora_A
    if scaling != 1.0:  # the default alpha = rank needs no extra kernel
        down = scaling * down
    hidden = F.linear(x, down)  # (..., in) -> (..., r)
    return F.linear(hidden, lora_B)  # (..., r) -> (..., out)


def low_rank_svd(down, up):
    """The SVD of ΔW = up·down from two QRs and an r×r SVD: exact, without forming the out×in matrix.

    Returns (left (out×r), singular values (r), right (r×in)), in float64.
    """
    q_up, r_up = torch.linalg.qr(up.double())  # (out, r), (r, r)
    q_down, r_down = torch.linalg.qr(down.double().T)  # (in, r), (r, r)
    u, singular_values, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, singular_values, vh @ q_down.T


def truncate_lora(down, up, rank: int):
    """The best rank-k plain LoRA (Eckart–Young) of up·down, split evenly as (√S·Vᵀ, U·√S)."""
    left, singular_values, right = low_rank_svd(down, up)
    root = singular_values[:rank].sqrt()
    return (root[:, None] * right[:rank]).to(down.dtype), (left[:, :rank] * root).to(up.dtype)
