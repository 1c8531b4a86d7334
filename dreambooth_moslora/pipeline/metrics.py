"""DreamBooth's metrics (Ruiz et al. 2023): DINO and CLIP-I subject fidelity, CLIP-T prompt fidelity.

Feature models are any transformers ids or local folders: a self-supervised ViT (DINO ViT-S/16 by default)
and a CLIP model (ViT-B/32 by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

from ..adapter.errors import UserInputError

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _load(loader, name, what):
    try:
        return loader(name)
    except (OSError, ValueError) as error:
        raise UserInputError(f"could not load the {what} model {name}: {str(error).splitlines()[0]}") from None


class DinoEmbedder:
    """The CLS token of a ViT's last layer, as the DreamBooth paper's DINO metric uses."""

    def __init__(self, name: str = DEFAULT_DINO, device="cpu"):
        self.processor = _load(AutoImageProcessor.from_pretrained, name, "DINO")
        self.model = _load(AutoModel.from_pretrained, name, "DINO").to(device).eval()
        self.device = device

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)


class ClipEmbedder:
    """CLIP's projected image and text embeddings, unit length."""

    def __init__(self, name: str = DEFAULT_CLIP, device="cpu"):
        self.processor = _load(AutoProcessor.from_pretrained, name, "CLIP")
        self.model = _load(CLIPModel.from_pretrained, name, "CLIP").to(device).eval()
        self.device = device

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(_tensor(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_tensor(features).float(), dim=-1)


def _tensor(output):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def mean_cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (a_i, b_j) of unit embeddings."""
    return (a @ b.T).mean().item()


def mean_self_similarity(a: torch.Tensor) -> float:
    """Mean cosine similarity over pairs i ≠ j: the real-vs-real ceiling of a subject's own photos."""
    n = a.shape[0]
    if n < 2:
        raise UserInputError("the real-vs-real ceiling needs at least two subject images")
    similarity = a @ a.T
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def mean_paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of row i of a with row i of b (an image with its own prompt)."""
    return (a * b).sum(dim=-1).mean().item()
