"""MoSLoRALinear: a frozen nn.Linear plus the low-rank bypass s·B·M·A, kept beside it (PEFT's wrapping)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MoSLoRAConfig
from .functional import delta_weight, low_rank_forward


class MoSLoRALinear(nn.Module):
    """Wraps `base_layer`; its parameters stay the base's, the adapter adds lora_A, lora_mixer and lora_B."""

    def __init__(self, base_layer: nn.Linear, config: MoSLoRAConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.scale = 1.0
        self.merged = False
        rank, device = config.rank, base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=device, dtype=dtype))
        self.lora_mixer = (
            nn.Parameter(torch.empty(rank, rank, device=device, dtype=dtype), requires_grad=config.train_mixer)
            if config.has_mixer
            else None
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.reset_adapter()

    def reset_adapter(self):
        """B = 0, so the adapted layer equals its base until the first step."""
        with torch.no_grad():
            if self.config.a_init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.config.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.lora_mixer is not None:
                init = self.config.mixer_init
                if init == "orthogonal":
                    nn.init.orthogonal_(self.lora_mixer)
                elif init == "kaiming":
                    nn.init.kaiming_uniform_(self.lora_mixer, a=math.sqrt(5))
                else:
                    nn.init.eye_(self.lora_mixer)
            self.lora_B.zero_()

    @property
    def scaling(self) -> float:
        """The config's s times the user's adapter scale."""
        return self.config.scaling * self.scale

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A, self.lora_mixer, self.lora_B, self.scaling)

    def forward(self, x):
        result = self.base_layer(x)
        if self.merged or self.scale == 0:
            return result
        update = low_rank_forward(
            self.dropout(x.to(self.lora_A.dtype)), self.lora_A, self.lora_mixer, self.lora_B, self.scaling
        )
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """W += ΔW, refusing a result that is not finite (the weight is left untouched then)."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def _add_to_base(self, delta: torch.Tensor):
        weight = self.base_layer.weight
        updated = weight.float() + delta.float()
        if not torch.isfinite(updated).all():
            raise ValueError("merging the adapter would make the base weight non-finite; nothing was changed")
        weight.copy_(updated.to(weight.dtype))

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, alpha={c.alpha}, mixer_init={c.mixer_init}, train_mixer={c.train_mixer}, merged={self.merged}"
