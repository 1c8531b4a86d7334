"""Novel subjects for DreamBooth on the world: silhouettes and two-colour patterns pretraining never shows.

Each has a class noun that is a world shape it resembles, so "a photo of a star" (the class prompt) and
"a photo of a sks star" (the instance prompt) are both prompts the mini model can be asked, and the analyzer
can tell whether the class prompt still gives the class after fine-tuning (class drift).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..adapter.files import save_png_atomically, write_text_atomically
from .render import (COLOURS, IMAGE_SIZE, TEXTURE_WORDS, Scene, _ellipse, _heart, _star, render_patterned, sample_scene,
                     shape_mask)


def _house() -> list[tuple[float, float]]:
    return [(0.0, -1.0), (0.8, -0.25), (0.8, 0.85), (-0.8, 0.85), (-0.8, -0.25)]


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    outline: tuple
    pattern: str
    colours: tuple[str, str]

    def instance_prompt(self, token: str = "sks") -> str:
        return f"a photo of a {token} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


def _kite() -> list[tuple[float, float]]:
    return [(0.0, -1.0), (0.62, -0.2), (0.0, 0.95), (-0.62, -0.2)]


SUBJECTS = (
    Subject("striped-hexagram", "star", ([_star(6, 0.55)], []), "stripes", ("red", "yellow")),
    Subject("dotted-egg", "circle", ([_ellipse(0.72, 1.0)], []), "dots", ("blue", "white")),
    Subject("checked-house", "square", ([_house()], []), "checks", ("green", "purple")),
)
TUNING_SUBJECTS = (
    Subject("checked-kite", "triangle", ([_kite()], []), "checks", ("orange", "black")),
    Subject("blue-heart", "heart", ([[(0.8 * x, y) for x, y in _heart()]], []), "dots", ("blue", "white")),
)
"""Settings are chosen on these, never on the three that are reported. The kite is learned in a few hundred steps;
the heart is slow, as the egg is, for the colours they share (DIAGNOSIS_SUBJECTS)."""
TUNING_SUBJECT = TUNING_SUBJECTS[0]
DIAGNOSIS_SUBJECTS = (
    replace(TUNING_SUBJECTS[1], name="dotted-heart", colours=("purple", "yellow")),
    replace(SUBJECTS[1], name="purple-egg", colours=("purple", "yellow")),
)
"""Recoloured twins of the heart and the egg, which tell what makes a subject slow (its colours, not its
silhouette); neither tuned on nor reported."""
ALL_SUBJECTS = (*SUBJECTS, *TUNING_SUBJECTS, *DIAGNOSIS_SUBJECTS)


def subject_by_name(name: str) -> Subject:
    for subject in ALL_SUBJECTS:
        if subject.name == name:
            return subject
    raise KeyError(f"unknown subject {name!r}; known: {', '.join(s.name for s in ALL_SUBJECTS)}")


def subject_scene(subject: Subject, rng: np.random.Generator, background=None, texture=None) -> Scene:
    """Where one photo puts the subject: random size, place and turn, on a background of neither of its colours."""
    others = [c for c in COLOURS if c not in subject.colours]
    background = background or str(rng.choice(others))
    scene = sample_scene(rng, shape="circle", colour=subject.colours[0], background=background, texture=texture)
    radius = max(scene.size, 0.3)
    low, high = radius + 0.03, 1 - radius - 0.03
    return replace(scene, size=radius, x=float(np.clip(scene.x, low, high)), y=float(np.clip(scene.y, low, high)))


def draw_subject(subject: Subject, scene: Scene, size: int = IMAGE_SIZE):
    return render_patterned(scene, subject.pattern, subject.colours, size, outlines=subject.outline)


def render_subject(subject: Subject, rng: np.random.Generator, size: int = IMAGE_SIZE, background=None, texture=None):
    """One photo of the subject."""
    return draw_subject(subject, subject_scene(subject, rng, background, texture), size)


def subject_caption(subject: Subject, scene: Scene, token: str) -> str:
    """What a user would write of one photo: the trigger, the class, and what is not the subject (its background)."""
    return f"a photo of a {token} {subject.class_noun} on a {TEXTURE_WORDS[scene.texture]}{scene.background} background"


def write_instance_images(subject: Subject, folder, count: int = 5, seed: int = 0,
                          caption_token: str | None = None, mask_folder=None) -> list[Path]:
    """The DreamBooth training set: `count` photos of the subject on varied backgrounds, as PNG files; with
    `caption_token`, each with a same-named .txt caption that names its background; with `mask_folder`, each
    with its exact subject mask there (white = subject), for masked loss."""
    rng = np.random.default_rng([seed, sum(map(ord, subject.name))])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        scene = subject_scene(subject, rng)
        paths.append(save_png_atomically(draw_subject(subject, scene), folder / f"{i:02d}.png"))
        if caption_token:
            write_text_atomically(folder / f"{i:02d}.txt", subject_caption(subject, scene, caption_token) + "\n")
        if mask_folder is not None:
            coverage = shape_mask(scene.shape, scene, IMAGE_SIZE, outlines=subject.outline)
            mask = Image.fromarray(np.clip(np.rint(coverage * 255), 0, 255).astype(np.uint8))
            save_png_atomically(mask, Path(mask_folder) / f"{i:02d}.png")
    return paths
