"""DreamBooth data: subject and class images, captions, aspect-ratio buckets and per-step augmentation.

Images are grouped into buckets of about resolution² pixels with sides a multiple of 64 (SDXL's training
buckets), so portrait and landscape photos keep their framing; every batch comes from one bucket.
SDXL's micro-conditioning (original size, crop top-left, target size) is recorded per sample.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image, ImageOps, UnidentifiedImageError

from ..adapter.errors import UserInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUCKET_STEP = 64
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Example:
    """One training image: where it is, what it says, and the (height, width) it trains at."""

    path: Path
    caption: str
    original_size: tuple[int, int]
    target_size: tuple[int, int]
    is_class: bool = False
    mask: Path | None = None
    """Where its loss mask comes from: a mask file, or the image itself for its alpha channel (masks.py)."""
    loss_weight: float = 1.0
    """Its concept's weight in the loss (the prior's for class examples)."""
    base_model_target: bool = False
    """A base-model prior example: its target is the frozen base model's own prediction (prior.py)."""


@dataclass(frozen=True)
class Sample:
    """One use of an example in one step: the augmentation drawn for it."""

    flip: bool
    crop_top_left: tuple[int, int]
    drop_caption: bool = False

    def caption(self, example: Example) -> str:
        """The caption this use trains on: the empty prompt when caption dropout drew it."""
        return "" if self.drop_caption else example.caption


def image_files(folder) -> list[Path]:
    """The images in a folder, sorted; raises when the folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"image folder not found: {folder}")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for broken in (p for p in candidates if p.is_symlink() and not p.exists()):
        logger.warning("skipping %s: a broken symbolic link (its target %s does not exist)", broken, os.readlink(broken))
    files = [p for p in candidates if p.is_file()]
    if not files:
        raise UserInputError(
            f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def load_rgb(path) -> Image.Image:
    """Any photo as 8-bit RGB: EXIF-rotated, alpha composited on white, 16-bit and CMYK converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 257.0, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of 64, at most resolution² pixels, aspect ratio up to 4:1."""
    if resolution < BUCKET_STEP:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = set()
    for width in range(BUCKET_STEP, int(resolution * MAX_ASPECT) + 1, BUCKET_STEP):
        height = (area // width) // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and max(width / height, height / width) <= MAX_ASPECT:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space), larger area on ties."""
    height, width = size
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def read_examples(folder, default_caption: str, resolution: int, bucketing: bool, is_class=False,
                  find_mask=None, caption_extension: str | None = ".txt", loss_weight: float = 1.0) -> list[Example]:
    """Every readable image of a folder; a corrupt one is skipped with a warning naming it. `find_mask(path)` gives
    each image's mask source (masks.mask_finder); a caption file (`caption_extension`, None for none) beside an
    image is its caption."""
    buckets = bucket_sizes(resolution) if bucketing else [(resolution, resolution)]
    examples = []
    for path in image_files(folder):
        try:
            width, height = load_rgb(path).size  # a full decode: truncated files fail here, not mid-training
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            logger.warning("skipping %s: not a readable image (%s)", path, error)
            continue
        caption_file = path.with_suffix(caption_extension) if caption_extension else None
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file and caption_file.is_file() else ""
        size = (height, width)
        mask = find_mask(path) if find_mask else None
        examples.append(Example(path, caption or default_caption, size, nearest_bucket(size, buckets), is_class, mask,
                                loss_weight))
    if not examples:
        raise UserInputError(f"no readable images in {folder}")
    return examples


def resized_size(original: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (height, width) with the image's aspect ratio that covers the target."""
    scale = max(target[0] / original[0], target[1] / original[1])
    return max(target[0], round(original[0] * scale)), max(target[1], round(original[1] * scale))


def has_crop_slack(example: Example) -> bool:
    return _crop_slack(example) != (0, 0)


def _crop_slack(example: Example) -> tuple[int, int]:
    resized = resized_size(example.original_size, example.target_size)
    return resized[0] - example.target_size[0], resized[1] - example.target_size[1]


def center_sample(example: Example, flip: bool) -> Sample:
    """The deterministic crop: what cached latents are encoded from."""
    slack_y, slack_x = _crop_slack(example)
    return Sample(flip, (slack_y // 2, slack_x // 2))


def draw_sample(example: Example, rng: random.Random, random_flip: bool, center_crop: bool,
                caption_dropout: float = 0.0) -> Sample:
    """The augmentation of one use of an example, drawn fresh every step (caption dropout last, so runs without it
    draw exactly what they drew before it existed)."""
    slack_y, slack_x = _crop_slack(example)
    crop = None if center_crop else (rng.randint(0, slack_y), rng.randint(0, slack_x))
    flip = random_flip and rng.random() < 0.5
    sample = Sample(flip, crop) if crop else center_sample(example, flip)
    if caption_dropout and rng.random() < caption_dropout:
        sample = replace(sample, drop_caption=True)
    return sample


def place(image: Image.Image, example: Example, sample: Sample, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resized to cover the bucket, cropped, maybe mirrored: what one use of the example shows (masks follow it)."""
    height, width = resized_size(example.original_size, example.target_size)
    image = image.resize((width, height), resample)
    top, left = sample.crop_top_left
    image = image.crop((left, top, left + example.target_size[1], top + example.target_size[0]))
    return ImageOps.mirror(image) if sample.flip else image


def render(example: Example, sample: Sample) -> torch.Tensor:
    """The image as the UNet's VAE sees it: resized, cropped, maybe mirrored, in [-1, 1], (3, H, W)."""
    pixels = torch.from_numpy(np.asarray(place(load_rgb(example.path), example, sample), dtype=np.float32))
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches of example indices: shuffled within each bucket, then batch order shuffled.

    A pure function of (seed, epoch), so a resumed run sees the same order as an uninterrupted one.
    """
    rng = random.Random(f"{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, example in enumerate(examples):
        by_bucket.setdefault(example.target_size, []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class Subject:
    """One instance concept's examples, each shown `repeats` times an epoch; `class_set` indexes the class examples
    that keep its class (None: nothing does)."""

    examples: tuple[Example, ...]
    repeats: int = 1
    class_set: int | None = None


@dataclass(frozen=True)
class TrainingSet:
    """What trains: the subjects, and the class sets that keep their classes.

    An epoch holds each subject's images × repeats and, from each class set, as many class examples as the subject
    images it serves, rotating through the set over epochs (DreamBooth's and kohya's balance). Batches therefore
    draw the subjects in proportion to images × repeats.
    """

    subjects: tuple[Subject, ...]
    class_sets: tuple[tuple[Example, ...], ...] = ()

    def examples(self) -> list[Example]:
        """Every distinct example once (what is cached and planned for)."""
        every = [e for s in self.subjects for e in s.examples] + [e for c in self.class_sets for e in c]
        return list(dict.fromkeys(every))

    def epoch(self, epoch: int) -> list[Example]:
        examples = [e for s in self.subjects for e in list(s.examples) * s.repeats]
        for index, classes in enumerate(self.class_sets):
            served = sum(len(s.examples) * s.repeats for s in self.subjects if s.class_set == index)
            start = epoch * served
            examples += [classes[(start + i) % len(classes)] for i in range(served)]
        return examples


def process_micro_batches(training_set: TrainingSet, batch_size: int, seed: int, num_processes: int,
                          process_index: int):
    """This process's endless stream of (micro-batch number, examples), epoch after epoch.

    Every process gets the same number of batches per epoch (the remainder is dropped), so none waits on another.
    """
    number, epoch = 0, 0
    while True:
        examples = training_set.epoch(epoch)
        batches = epoch_batches(examples, batch_size, seed, epoch)
        per_process = len(batches) // num_processes
        if per_process == 0:
            raise UserInputError(
                f"{len(batches)} batches per epoch cannot feed {num_processes} processes; "
                "add images, raise --repeats or lower --train_batch_size"
            )
        for batch in batches[process_index::num_processes][:per_process]:
            yield number, [examples[i] for i in batch]
            number += 1
        epoch += 1


class MicroBatches(Dataset):
    """Micro-batches drawn and rendered from (seed, micro-batch number, process): the same on resume, in workers."""

    def __init__(self, plan, seed: int, process_index: int, random_flip: bool, center_crop: bool, render_pixels: bool,
                 caption_dropout: float = 0.0, render_mask=None):
        self.plan = plan
        self.seed, self.process_index = seed, process_index
        self.random_flip, self.center_crop, self.render_pixels = random_flip, center_crop, render_pixels
        self.caption_dropout, self.render_mask = caption_dropout, render_mask

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, item):
        number, examples = self.plan[item]
        rng = random.Random(f"{self.seed}-{number}-{self.process_index}")
        samples = [draw_sample(e, rng, self.random_flip, self.center_crop, self.caption_dropout) for e in examples]
        pixels = torch.stack([render(e, s) for e, s in zip(examples, samples)]) if self.render_pixels else None
        masks = torch.stack([self.render_mask(e, s) for e, s in zip(examples, samples)]) if self.render_mask else None
        return number, examples, samples, pixels, masks


def keep_as_is(item):
    """DataLoader collate for items that are already batches."""
    return item
