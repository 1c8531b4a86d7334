"""Masked loss: masks are found, follow their photo through resize, crop and flip, and weight the loss."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import training_argv
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.data import draw_sample, read_examples, render
from dreambooth_moslora.trainer.masks import loss_weights, mask_finder, render_mask
from dreambooth_moslora.trainer.train import train
from helpers import write_images


def _half_red_photo(folder, size=(96, 64)):
    """Red on the left half, blue on the right; its mask is white where it is red."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    Image.fromarray(pixels).save(folder / "photo.jpg", quality=100)
    return Image.fromarray(((pixels[..., 0] > 127) * 255).astype(np.uint8))


def test_a_mask_follows_its_photo_through_resize_crop_and_flip(tmp_path):
    _half_red_photo(tmp_path / "photos").save(tmp_path / "photo-mask.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "photo-mask.png").rename(tmp_path / "masks" / "photo.png")
    [example] = read_examples(tmp_path / "photos", "x", 64, bucketing=False, find_mask=mask_finder(tmp_path / "masks"))
    rng = random.Random(0)
    for _ in range(6):
        sample = draw_sample(example, rng, random_flip=True, center_crop=False)
        red = render(example, sample)[0] > 0  # the red channel, in [-1, 1]
        mask = render_mask(example, sample)[0] > 0.5
        assert (red == mask).float().mean() > 0.97


def test_masks_that_are_missing_or_without_alpha_are_refused_by_name(tmp_path):
    write_images(tmp_path / "photos", sizes=((64, 64),))
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserInputError, match="has no mask for 00.png"):
        read_examples(tmp_path / "photos", "x", 64, False, find_mask=mask_finder(tmp_path / "masks"))
    with pytest.raises(UserInputError, match="has no alpha channel"):
        read_examples(tmp_path / "photos", "x", 64, False, find_mask=mask_finder(alpha_mask=True))
    with pytest.raises(UserInputError, match="--mask_dir not found"):
        mask_finder(tmp_path / "nowhere")


def test_the_alpha_channel_is_a_mask(tmp_path):
    (tmp_path / "photos").mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "photos" / "cut-out.png")
    [example] = read_examples(tmp_path / "photos", "x", 64, False, find_mask=mask_finder(alpha_mask=True))
    mask = render_mask(example, draw_sample(example, random.Random(0), False, True))[0]
    assert mask[:, :30].min() == 1 and mask[:, 34:].max() == 0


def test_loss_weights_shrink_by_area_and_weigh_the_rest():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :4] = 1
    weights = loss_weights(masks, (2, 2), unmasked_weight=0.1)
    assert torch.allclose(weights, torch.tensor([[[[1.0, 0.1], [1.0, 0.1]]]]))


@pytest.mark.parametrize("fill, learns", [(0, False), (255, True)])
def test_a_black_mask_learns_nothing_and_a_white_one_learns_as_unmasked(tiny_sdxl_dir, tmp_path, fresh_accelerate,
                                                                         fill, learns):
    from accelerate.state import AcceleratorState

    write_images(tmp_path / "subject", sizes=((64, 64), (64, 64)))
    (tmp_path / "masks").mkdir()
    for name in ("00", "01"):
        Image.new("L", (64, 64), fill).save(tmp_path / "masks" / f"{name}.png")
    masked = train(parse_args(training_argv(tiny_sdxl_dir, tmp_path / "subject", tmp_path / "masked", "--mask_dir",
                                            str(tmp_path / "masks"), steps=2)))
    AcceleratorState._reset_state(reset_partial_state=True)
    plain = train(parse_args(training_argv(tiny_sdxl_dir, tmp_path / "subject", tmp_path / "plain", steps=2)))
    if learns:
        assert masked.losses == pytest.approx(plain.losses, rel=1e-5)
    else:
        assert masked.losses == [0.0, 0.0]
