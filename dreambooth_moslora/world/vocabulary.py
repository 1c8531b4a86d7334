"""The mini model's tokenizer: CLIP's byte-level BPE over the world's words and everyday English.

Every word below is one token, as common words are in SDXL's CLIP vocabulary. Words the world never says
(including trigger words such as "sks") keep the embedding they were initialised with, so a trigger starts
out as a rare token with almost no meaning, the situation DreamBooth is designed for. Anything else still
tokenizes, byte by byte.
"""

from __future__ import annotations

import math
import re

from transformers import CLIPTokenizer

from ..dreambooth_prompts import LIVE_SUBJECT_PROMPTS, OBJECT_PROMPTS
from ..tiny import byte_unicode_map
from .render import COLOURS, SHAPES, TEXTURE_WORDS

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TRIGGER_WORDS = ("sks", "zwx", "ohwx", "xyz", "qwe")
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


def world_words() -> list[str]:
    return sorted(set(COLOURS) | set(SHAPES) | {w.strip() for w in TEXTURE_WORDS.values() if w.strip()} | {"background"})


def vocabulary_words() -> list[str]:
    prompt_words = {w for p in OBJECT_PROMPTS + LIVE_SUBJECT_PROMPTS for w in re.findall(r"[a-z]+", p.lower())}
    words = set(EVERYDAY_WORDS) | set(world_words()) | set(TRIGGER_WORDS) | prompt_words
    return sorted(words - {"token", "noun"})


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the best-ranked adjacent pair until no pair is a merge."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def world_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each word one token: a word the merges so far leave in pieces gets its pieces
    joined left to right by new merges ranked after all earlier ones, so earlier words are not disturbed."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(word, ranks)
        joined = pieces[0]
        for piece in pieces[1:]:
            if (joined, piece) not in ranks:
                ranks[(joined, piece)] = len(merges)
                merges.append((joined, piece))
            joined += piece
    return merges


def build_world_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Byte symbols, then one token per merge, then the special tokens; the same every time it is built."""
    alphabet = list(byte_unicode_map().values())
    merges = world_merges(vocabulary_words())
    tokens = alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
    unique = list(dict.fromkeys(tokens))
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(unique)}, merges=merges, model_max_length=max_length)
