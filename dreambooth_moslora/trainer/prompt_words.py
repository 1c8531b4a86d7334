"""Prompts: reading them from options and files, and whether one names the subject.

DreamBooth binds the subject to a rare word (the trigger, e.g. "sks"); a prompt made only of ordinary words
teaches the model to draw the subject for those words, and it has no name of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..adapter.errors import UserInputError
from .dreambooth_prompts import LIVE_SUBJECT_PROMPTS, OBJECT_PROMPTS

EVERYDAY_WORDS = """
a an the of on in at to with and or but for from by as is are was be it its this that these those my your
photo picture image painting drawing render rendering sketch style close up view front back side top bottom
left right center middle small large big tiny huge little bright dark light shiny wet dry old new clean
dog cat bird horse cow sheep fish bear duck rabbit puppy kitten person man woman boy girl child face hand
backpack bowl can candle boot clock sneaker teapot toy vase glasses sunglasses cup mug bottle chair table
car house tree flower grass sky sun cloud water sea ocean beach river lake mountain forest jungle snow city
street road floor wall rug fabric wood wooden stone metal glass paper plastic gold silver brown gray grey
pink cyan teal rainbow colour color colorful shape object thing pattern striped dotted checkered plaid
hat scarf shirt top outfit chef firefighter police wizard monocle santa eiffel tower field wheat autumn
leaves milk mirror sidewalk crowded dirt sunflowers around floating cobblestone cube shaped purple red
high quality detailed realistic cartoon simple plain one two three many some very good best beautiful
""".split()


def ordinary_words() -> set[str]:
    """Everyday words and the DreamBooth benchmark prompts' words: a heuristic list, which errs on "rare"."""
    prompt_words = {w for p in OBJECT_PROMPTS + LIVE_SUBJECT_PROMPTS for w in re.findall(r"[a-z]+", p.lower())}
    return (set(EVERYDAY_WORDS) | prompt_words) - {"token", "noun"}


def trigger_words(instance_prompt: str, class_prompt: str | None = None) -> set[str]:
    """The words of the instance prompt that are neither ordinary nor words of the class prompt: "sks" in "a photo
    of sks dog" with class "a photo of a puppy" ("dog" is ordinary, so it stays a word of the class)."""
    known = ordinary_words() | set(prompt_words(class_prompt or ""))
    return {word for word in prompt_words(instance_prompt) if word not in known}


def has_trigger_word(instance_prompt: str, class_prompt: str | None = None) -> bool:
    return bool(trigger_words(instance_prompt, class_prompt))


def prompt_words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def read_prompts(prompts: list[str] | None = None, prompts_file=None) -> list[str]:
    """Prompts given one by one, or one per line of a file (blank lines and # comments skipped)."""
    found = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserInputError(f"prompts file not found: {path}")
        found += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise UserInputError(f"prompts file {path} has no prompts")
    if not found:
        raise UserInputError("give at least one --prompt or a --prompts_file")
    return found
