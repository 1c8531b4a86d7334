"""The world's judge: a small CNN that reads shape, object colour and background colour off a 32 px image.

Trained only on fresh renders (every attribute combination, blurred and noised so that generated images are
not a surprise), it plays two roles in the benchmark: the attribute classifier that checks prompt fidelity,
and the feature embedding (its pooled penultimate layer, L2-normalised) that measures subject similarity,
as DINO does for real photos.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter.errors import UserInputError
from .render import COLOURS, IMAGE_SIZE, SHAPES, render, sample_scene, to_pixels

ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "background": tuple(COLOURS)}
FEATURES = 128


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
        nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
    )


class WorldAnalyzer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_block(3, 24), _block(24, 48), _block(48, 96), _block(96, FEATURES)])
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1] -> (N, FEATURES)."""
        x = pixels
        for index, block in enumerate(self.blocks):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
        return x.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in ATTRIBUTES.items()}


def _degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and colour shift: what a VAE round trip or a small diffusion model does to an image."""
    count = pixels.shape[0]
    sigma = torch.rand(count, generator=generator) * 1.2
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (N, 5), separable
    padded = F.pad(pixels, (2, 2, 2, 2), mode="replicate")
    rows = sum(kernels[:, k, None, None, None] * padded[:, :, :, k : k + IMAGE_SIZE] for k in range(5))
    blurred = sum(kernels[:, k, None, None, None] * rows[:, :, k : k + IMAGE_SIZE, :] for k in range(5))
    noise = torch.randn(pixels.shape, generator=generator) * torch.rand(count, 1, 1, 1, generator=generator) * 0.1
    shift = (torch.rand(count, 3, 1, 1, generator=generator) - 0.5) * 0.12
    return (blurred + noise + shift).clamp(-1, 1)


def render_batch(rng: np.random.Generator, count: int):
    scenes = [sample_scene(rng) for _ in range(count)]
    return scenes, to_pixels([render(s) for s in scenes])


def train_analyzer(steps: int = 1500, batch_size: int = 96, seed: int = 0, log=print) -> WorldAnalyzer:
    torch.manual_seed(seed)
    model = WorldAnalyzer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        scenes, pixels = render_batch(rng, batch_size)
        logits = model(_degrade(pixels, generator))
        loss = sum(F.cross_entropy(logits[name], target) for name, target in _labels(scenes).items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"analyzer step {step}: loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def analyze(model: WorldAnalyzer, images) -> list[dict[str, str]]:
    """Each image's most likely shape, object colour and background colour."""
    logits = model(to_pixels(images))
    best = {name: logits[name].argmax(dim=1).tolist() for name in ATTRIBUTES}
    return [{name: ATTRIBUTES[name][best[name][i]] for name in ATTRIBUTES} for i in range(len(images))]


@torch.no_grad()
def embed(model: WorldAnalyzer, images) -> torch.Tensor:
    """(N, FEATURES) unit vectors: cosine similarity of two images is their dot product."""
    return F.normalize(model.features(to_pixels(images)), dim=-1)


@torch.no_grad()
def accuracy(model: WorldAnalyzer, images, scenes) -> dict[str, float]:
    found = analyze(model, images)
    return {name: float(np.mean([f[name] == getattr(s, name) for f, s in zip(found, scenes)])) for name in ATTRIBUTES}


def save_analyzer(model: WorldAnalyzer, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": "world-analyzer"})


def load_analyzer(path) -> WorldAnalyzer:
    model = WorldAnalyzer()
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as error:
        raise UserInputError(f"{path} is not a world analyzer file: {str(error).splitlines()[0]}") from None
    return model.eval()
