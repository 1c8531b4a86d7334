import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.data import (
    Example,
    bucket_sizes,
    center_sample,
    draw_sample,
    Subject,
    TrainingSet,
    epoch_batches,
    image_files,
    load_rgb,
    nearest_bucket,
    process_micro_batches,
    read_examples,
    render,
)
from helpers import write_images


def test_buckets_are_multiples_of_64_within_the_pixel_budget():
    buckets = bucket_sizes(1024)
    assert (1024, 1024) in buckets and (832, 1216) in buckets and (1216, 832) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 for h, w in buckets)
    assert all(max(h / w, w / h) <= 4 for h, w in buckets)


def test_nearest_bucket_keeps_the_aspect_ratio():
    buckets = bucket_sizes(1024)
    height, width = nearest_bucket((3024, 4032), buckets)  # a 4:3 landscape phone photo
    assert width > height and abs(width / height - 4 / 3) < 0.1
    height, width = nearest_bucket((4032, 3024), buckets)
    assert height > width


def test_read_examples_buckets_captions_and_skips_corrupt_files(tmp_path, caplog):
    write_images(tmp_path, sizes=((256, 128), (128, 256), (128, 128)))
    (tmp_path / "01.txt").write_text("a photo of sks dog in the snow\n")
    (tmp_path / "99.jpg").write_bytes(b"not really a jpeg")
    with caplog.at_level(logging.WARNING):
        examples = read_examples(tmp_path, "a photo of sks dog", resolution=128, bucketing=True)
    assert "99.jpg" in caplog.text
    assert [e.path.name for e in examples] == ["00.png", "01.png", "02.png"]
    assert [e.caption for e in examples] == ["a photo of sks dog", "a photo of sks dog in the snow", "a photo of sks dog"]
    landscape, portrait, square = (e.target_size for e in examples)
    assert landscape[1] > landscape[0] and portrait[0] > portrait[1] and square[0] == square[1]
    assert examples[0].original_size == (128, 256)


def test_without_bucketing_every_image_is_square(tmp_path):
    write_images(tmp_path, sizes=((256, 128), (128, 256)))
    examples = read_examples(tmp_path, "x", resolution=64, bucketing=False)
    assert {e.target_size for e in examples} == {(64, 64)}


def test_missing_empty_and_imageless_folders_are_named(tmp_path):
    with pytest.raises(UserInputError, match="image folder not found"):
        image_files(tmp_path / "nope")
    with pytest.raises(UserInputError, match="no images in"):
        image_files(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserInputError, match="no images in"):
        image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserInputError, match="no readable images"):
        read_examples(tmp_path, "x", 64, True)


def test_load_rgb_handles_alpha_grayscale_16bit_cmyk_and_exif(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    assert load_rgb(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    Image.new("L", (4, 4), 100).save(tmp_path / "gray.png")
    assert load_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (100, 100, 100)
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert red[0] > 200 and red[1] < 60
    rotated = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    assert load_rgb(tmp_path / "exif.jpg").size == (4, 6)


def _example(tmp_path, size=(160, 96), target=(64, 128)):
    path = write_images(tmp_path, sizes=(size,))[0]
    return Example(path, "x", (size[1], size[0]), target)


def test_random_crop_and_flip_are_drawn_per_use(tmp_path):
    example = _example(tmp_path)
    rng = random.Random(0)
    samples = {draw_sample(example, rng, random_flip=True, center_crop=False) for _ in range(40)}
    assert len({s.flip for s in samples}) == 2
    assert len({s.crop_top_left for s in samples}) > 3
    centered = draw_sample(example, rng, random_flip=False, center_crop=True)
    assert centered == center_sample(example, False)


def test_caption_dropout_is_drawn_per_use_after_the_augmentation(tmp_path):
    example = _example(tmp_path)
    plain = [draw_sample(example, random.Random(seed), True, False) for seed in range(200)]
    dropping = [draw_sample(example, random.Random(seed), True, False, caption_dropout=0.3) for seed in range(200)]
    assert [(s.flip, s.crop_top_left) for s in plain] == [(s.flip, s.crop_top_left) for s in dropping]
    dropped = [s for s in dropping if s.drop_caption]
    assert 30 < len(dropped) < 90 and not any(s.drop_caption for s in plain)
    assert dropped[0].caption(example) == "" and plain[0].caption(example) == example.caption


def test_render_crops_to_the_bucket_and_mirrors(tmp_path):
    example = _example(tmp_path)
    sample = center_sample(example, flip=False)
    pixels = render(example, sample)
    assert pixels.shape == (3, 64, 128) and -1 <= pixels.min() and pixels.max() <= 1
    mirrored = render(example, center_sample(example, flip=True))
    torch.testing.assert_close(mirrored, pixels.flip(-1))


def test_epoch_batches_come_from_one_bucket_and_depend_only_on_seed_and_epoch(tmp_path):
    examples = [Example(tmp_path / f"{i}.png", "x", (64, 64), (64, 64) if i % 2 else (64, 128)) for i in range(10)]
    batches = epoch_batches(examples, 2, seed=3, epoch=1)
    assert all(len({examples[i].target_size for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == epoch_batches(examples, 2, seed=3, epoch=1)
    assert batches != epoch_batches(examples, 2, seed=3, epoch=2)


def test_prior_epochs_pair_instances_with_rotating_class_images(tmp_path):
    instance = [Example(tmp_path / f"i{i}.png", "x", (64, 64), (64, 64)) for i in range(2)]
    classes = [Example(tmp_path / f"c{i}.png", "y", (64, 64), (64, 64), is_class=True) for i in range(5)]
    training_set = TrainingSet((Subject(tuple(instance), repeats=2, class_set=0),), (tuple(classes),))
    first, second = (training_set.epoch(e) for e in (0, 1))
    assert sum(e.is_class for e in first) == 4 and sum(not e.is_class for e in first) == 4
    assert {e.path.name for e in first + second if e.is_class} == {f"c{i}.png" for i in range(5)}


def test_processes_get_disjoint_equal_shares(tmp_path):
    examples = [Example(tmp_path / f"{i}.png", "x", (64, 64), (64, 64)) for i in range(5)]
    take = lambda rank: [b for _, b in zip(range(2), process_micro_batches(
        TrainingSet((Subject(tuple(examples)),)), 1, 0, 2, rank))]
    first, second = take(0), take(1)
    assert len(first) == len(second) == 2
    assert not {e.path for _, b in first for e in b} & {e.path for _, b in second for e in b}
