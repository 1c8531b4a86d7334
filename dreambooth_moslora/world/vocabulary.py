"""The mini model's tokenizer: CLIP's byte-level BPE over the world's words and everyday English.

Every word below is one token, as common words are in SDXL's CLIP vocabulary. Words the world never says
(including trigger words such as "sks") keep the embedding they were initialised with, so a trigger starts
out as a rare token with almost no meaning, the situation DreamBooth is designed for. Anything else still
tokenizes, byte by byte.
"""

from __future__ import annotations

import math

from transformers import CLIPTokenizer

from ..pipeline.tiny import byte_unicode_map
from ..trainer.prompt_words import ordinary_words
from .render import COLOURS, SHAPES, TEXTURE_WORDS

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TRIGGER_WORDS = ("sks", "zwx", "ohwx", "xyz", "qwe")


def world_words() -> list[str]:
    return sorted(set(COLOURS) | set(SHAPES) | {w.strip() for w in TEXTURE_WORDS.values() if w.strip()} | {"background"})


def vocabulary_words() -> list[str]:
    return sorted(ordinary_words() | set(world_words()) | set(TRIGGER_WORDS))


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
