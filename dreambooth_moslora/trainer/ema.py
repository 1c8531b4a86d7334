"""An exponential moving average of the adapter's weights, as SimpleTuner, OneTrainer and ai-toolkit keep it.

The average is what gets exported, validated and written into checkpoints; the trained weights go on training. The
decay warms up as in diffusers' EMAModel (see decay_at), so early averages are not dominated by the zero B.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..adapter.errors import UserInputError
from ..adapter.inject import moslora_parameters
from ..adapter.io import write_safetensors
from ..adapter.trigger import trigger_parameters

EMA_FILE = "ema.safetensors"
TRAINED_FILE = "trained_weights.safetensors"
"""A checkpoint's adapter as trained (its moslora.safetensors holds the average), to resume from."""


def adapter_parameters(models: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """moslora_parameters and the learned trigger of each model, named `<component>.<parameter name>` for the checkpoint file."""
    named = {}
    for component, model in models.items():
        trainable = {id(p) for p in moslora_parameters(model) + trigger_parameters(model)}
        named.update({f"{component}.{name}": p for name, p in model.named_parameters() if id(p) in trainable})
    return named


class AdapterEMA:
    def __init__(self, parameters: dict[str, nn.Parameter], decay: float, device="cpu"):
        self.parameters, self.decay = parameters, decay
        self.shadow = {name: p.detach().to(device=device, dtype=torch.float32, copy=True) for name, p in parameters.items()}

    def decay_at(self, step: int) -> float:
        """After optimizer step `step` (counted from 1), as diffusers' EMAModel: the first update copies the
        weights, update k after it keeps min(decay, (1 + k) / (10 + k))."""
        k = step - 1
        return 0.0 if k <= 0 else min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, step: int):
        """After optimizer step `step` (counted from 1)."""
        keep = self.decay_at(step)
        for name, p in self.parameters.items():
            average = self.shadow[name]
            average.mul_(keep).add_(p.detach().to(average.device, torch.float32), alpha=1 - keep)

    @contextmanager
    def applied(self):
        """The averaged weights in the model inside the block, the trained ones again after it."""
        trained = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(trained[name])

    def save(self, folder):
        """The average, and the weights as trained (the folder's adapter file holds the average)."""
        write_safetensors({name: t.contiguous() for name, t in self.shadow.items()}, Path(folder) / EMA_FILE,
                          {"decay": str(self.decay)})
        write_safetensors({name: p.detach().contiguous() for name, p in self.parameters.items()},
                          Path(folder) / TRAINED_FILE, {})

    def load(self, folder):
        """The average, and the trained weights into the model (checkpoints from before TRAINED_FILE held them in
        their adapter file, already loaded)."""
        folder = Path(folder)
        copy_stored(folder / EMA_FILE, self.shadow)
        if (folder / TRAINED_FILE).is_file():
            copy_stored(folder / TRAINED_FILE, self.parameters)


@torch.no_grad()
def copy_stored(path, tensors: dict):
    """A safetensors file's tensors into `tensors` (parameters or the average), which must hold the same names."""
    stored = load_file(str(path))
    if stored.keys() != tensors.keys():
        raise UserInputError(f"{path} does not hold this run's adapter (another adapter configuration)")
    for name, tensor in stored.items():
        tensors[name].copy_(tensor)


def averaged_weights(ema: AdapterEMA | None):
    """The EMA weights inside the block when there is an EMA, the trained ones otherwise."""
    return ema.applied() if ema is not None else nullcontext()
