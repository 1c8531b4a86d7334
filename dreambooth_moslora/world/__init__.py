"""A toy world of coloured shapes, a mini SDXL pretrained on it, a judge that reads it, and DreamBooth measured on it.

render (the world), vocabulary (its tokenizer), model (the mini SDXL's architecture), analyzer (the judge),
pretrain (reproducing `assets/mini-sdxl` from a seed), subjects (novel objects), personalization (the benchmark).
"""

from .analyzer import analyze, embed, load_analyzer
from .render import Scene, render, sample_scene
from .subjects import SUBJECTS, write_instance_images

__all__ = ["SUBJECTS", "Scene", "analyze", "embed", "load_analyzer", "render", "sample_scene", "write_instance_images"]
