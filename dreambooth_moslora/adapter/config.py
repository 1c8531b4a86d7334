"""The MoSLoRA adapter configuration (Wu et al. 2024, arXiv 2406.11909)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import ConfigError

MIXER_INITS = ("orthogonal", "kaiming", "identity", "none")
A_INITS = ("gaussian", "kaiming")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class MoSLoRAConfig:
    """How every adapted linear layer is built: ΔW·x = s·B·M·A·x."""

    rank: int = 4
    alpha: float | None = None
    """Scale numerator; None means alpha = rank, so s = 1 (s = alpha/√rank with use_rslora)."""
    mixer_init: str = "orthogonal"
    """orthogonal (paper's SDXL setting), kaiming (official code), identity, or none (plain LoRA, no mixer)."""
    target_modules: tuple[str, ...] = UNET_TARGETS
    """A linear layer is adapted when its qualified name equals a target or ends with '.' + target."""
    dropout: float = 0.0
    use_rslora: bool = False
    a_init: str = "gaussian"
    """gaussian (std 1/rank, as diffusers' SDXL DreamBooth LoRA script) or kaiming (uniform, a=√5)."""
    train_mixer: bool = True
    """False freezes M at its initial value: the control that separates learning M from merely having it."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.mixer_init not in MIXER_INITS:
            raise ConfigError(f"mixer_init must be one of {', '.join(MIXER_INITS)}; got {self.mixer_init!r}")
        if self.a_init not in A_INITS:
            raise ConfigError(f"a_init must be one of {', '.join(A_INITS)}; got {self.a_init!r}")
        if isinstance(self.target_modules, str):
            raise ConfigError("target_modules must be a sequence of module names, not one string")
        targets = tuple(self.target_modules)
        if not targets or not all(isinstance(t, str) and t.strip(" .") for t in targets):
            raise ConfigError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)
        if not self.train_mixer and not self.has_mixer:
            raise ConfigError("train_mixer=False needs a mixer; mixer_init none has none to freeze")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def has_mixer(self) -> bool:
        return self.mixer_init != "none"

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: dict) -> "MoSLoRAConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MoSLoRA config fields: {', '.join(unknown)}")
        return cls(**{**values, "target_modules": tuple(values.get("target_modules", UNET_TARGETS))})
