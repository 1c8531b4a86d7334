"""A procedural image world small enough for a diffusion model to learn on a CPU.

A scene is one solid-coloured object (8 shapes x 8 colours, any size, position and rotation) on a plain or
lightly textured background of another colour, captioned "a photo of a red star on a blue background".
Shapes are drawn as masks 4x larger than the image and box-filtered down, so edges are anti-aliased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
TEXTURES = ("plain", "gradient", "grid", "speckled")
TEXTURE_ODDS = (0.5, 1 / 6, 1 / 6, 1 / 6)
TEXTURE_WORDS = {"plain": "", "gradient": "shaded ", "grid": "tiled ", "speckled": "speckled "}


def _regular_polygon(corners: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * k / corners), math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outline = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + math.pi * k / points
        outline.append((radius * math.cos(angle), radius * math.sin(angle)))
    return outline


def _heart() -> list[tuple[float, float]]:
    outline = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        outline.append((x / 17, -(y + 2.5) / 17))
    return outline


def _cross(arm: float = 0.36) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _ellipse(width: float, height: float) -> list[tuple[float, float]]:
    return [(width * x, height * y) for x, y in _regular_polygon(64)]


# Each shape is filled polygons minus cut-out polygons, in unit coordinates (radius 1, y pointing down).
SHAPES = {
    "circle": ([_regular_polygon(64)], []),
    "square": ([[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]], []),
    "triangle": ([_regular_polygon(3, -math.pi / 2)], []),
    "star": ([_star(5, 0.42)], []),
    "heart": ([_heart()], []),
    "cross": ([_cross()], []),
    "ring": ([_regular_polygon(64)], [_ellipse(0.55, 0.55)]),
    "moon": ([_regular_polygon(64)], [[(x + 0.55, y - 0.2) for x, y in _ellipse(0.85, 0.85)]]),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    texture: str = "plain"
    size: float = 0.33  # object radius as a fraction of the image side
    x: float = 0.5  # object centre, fractions of the image side
    y: float = 0.5
    angle: float = 0.0  # degrees
    texture_seed: int = 0

    @property
    def caption(self) -> str:
        return f"a photo of a {self.colour} {self.shape} on a {TEXTURE_WORDS[self.texture]}{self.background} background"


def sample_scene(rng: np.random.Generator, shape=None, colour=None, background=None, texture=None) -> Scene:
    """Random size, placement and rotation; attributes not given are drawn too, object and background differ."""
    shape = shape or rng.choice(list(SHAPES))
    colour = colour or rng.choice([c for c in COLOURS if c != background])
    background = background or rng.choice([c for c in COLOURS if c != colour])
    size = float(rng.uniform(0.26, 0.4))
    return Scene(
        shape=str(shape),
        colour=str(colour),
        background=str(background),
        texture=str(texture or rng.choice(TEXTURES, p=TEXTURE_ODDS)),
        size=size,
        x=float(rng.uniform(size + 0.03, 1 - size - 0.03)),
        y=float(rng.uniform(size + 0.03, 1 - size - 0.03)),
        angle=float(rng.uniform(0, 360)),
        texture_seed=int(rng.integers(2**31)),
    )


def background_pixels(colour: str, texture: str, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) float in 0..255: the colour, lightly varied so the colour itself is never in doubt."""
    rng = np.random.default_rng(seed)
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    light = np.zeros((size, size), dtype=np.float32)
    if texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        light = 0.35 * (math.cos(angle) * xs + math.sin(angle) * ys)
    elif texture == "grid":
        step = int(rng.integers(5, 9))
        lines = (np.arange(size) % step) == 0
        light = np.where(lines[:, None] | lines[None, :], -0.22, 0.0).astype(np.float32)
    elif texture == "speckled":
        light = np.where(rng.random((size, size)) < 0.15, -0.25, 0.0).astype(np.float32)
    # Darken towards black, lighten towards white, so dark and light colours both keep their texture.
    towards = np.where(light[..., None] < 0, 0.0, 255.0)
    return base + np.abs(light)[..., None] * (towards - base)


def shape_mask(shape: str, scene: Scene, size: int = IMAGE_SIZE, outlines=None) -> np.ndarray:
    """(size, size) coverage in 0..1 of the shape placed as the scene says; `outlines` overrides the shape's."""
    filled, cut = outlines or SHAPES[shape]
    big = size * SUPERSAMPLE
    radius = scene.size * big
    cos, sin = math.cos(math.radians(scene.angle)), math.sin(math.radians(scene.angle))

    def place(polygon):
        return [(scene.x * big + radius * (cos * px - sin * py), scene.y * big + radius * (sin * px + cos * py)) for px, py in polygon]

    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in filled:
        draw.polygon(place(polygon), fill=255)
    for polygon in cut:
        draw.polygon(place(polygon), fill=0)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def compose(background: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> Image.Image:
    """Alpha-blend `fill` (a colour or an image of colours) over the background through the coverage mask."""
    pixels = background * (1 - mask[..., None]) + np.broadcast_to(fill, background.shape) * mask[..., None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    background = background_pixels(scene.background, scene.texture, scene.texture_seed, size)
    return compose(background, shape_mask(scene.shape, scene, size), np.asarray(COLOURS[scene.colour], dtype=np.float32))


def render_patterned(scene: Scene, pattern: str, colours: tuple[str, str], size: int = IMAGE_SIZE,
                     outlines=None) -> Image.Image:
    """The scene with its object filled with a two-colour pattern (and, with `outlines`, another silhouette)."""
    background = background_pixels(scene.background, scene.texture, scene.texture_seed, size)
    return compose(background, shape_mask(scene.shape, scene, size, outlines), pattern_fill(scene, pattern, colours, size))


def to_pixels(images) -> torch.Tensor:
    """PIL images (resized to 32 px if needed) -> (N, 3, 32, 32) float in [-1, 1], the VAE's input range."""
    arrays = [np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def pattern_fill(scene: Scene, pattern: str, colours: tuple[str, str], size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) two-colour stripes, dots or checks fixed to the object, so they turn with it."""
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    cos, sin = math.cos(math.radians(scene.angle)), math.sin(math.radians(scene.angle))
    u = (cos * (xs - scene.x) + sin * (ys - scene.y)) / scene.size  # object frame, radius 1
    v = (-sin * (xs - scene.x) + cos * (ys - scene.y)) / scene.size
    if pattern == "stripes":
        second = np.floor(u * 2.5) % 2 == 1
    elif pattern == "dots":
        cell_u, cell_v = (u * 2.2) % 1 - 0.5, (v * 2.2) % 1 - 0.5
        second = cell_u**2 + cell_v**2 < 0.09
    elif pattern == "checks":
        second = (np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    first, other = (np.asarray(COLOURS[c], dtype=np.float32) for c in colours)
    return np.where(second[..., None], other, first)
