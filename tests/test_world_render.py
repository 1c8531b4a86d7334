import numpy as np
import pytest

from dreambooth_moslora.world.render import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    TEXTURES,
    Scene,
    pattern_fill,
    render,
    sample_scene,
    shape_mask,
    to_pixels,
)


def test_scenes_and_renders_are_reproducible_from_the_seed():
    first = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    again = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    other = sample_scene(np.random.default_rng(6))
    assert first == again and first[0] != other
    assert np.array_equal(np.asarray(render(first[0])), np.asarray(render(again[0])))
    assert render(first[0]).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_sampled_scenes_cover_the_world_and_never_hide_the_object():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    assert {s.shape for s in scenes} == set(SHAPES) and len(SHAPES) >= 6
    assert {s.colour for s in scenes} == set(COLOURS) and len(COLOURS) >= 8
    assert {s.texture for s in scenes} == set(TEXTURES)
    assert all(s.colour != s.background for s in scenes)
    assert all(s.size <= s.x <= 1 - s.size and s.size <= s.y <= 1 - s.size for s in scenes)


def test_caption_names_colour_shape_and_background():
    scene = Scene(shape="star", colour="red", background="blue")
    assert scene.caption == "a photo of a red star on a blue background"
    assert Scene("ring", "white", "black", texture="speckled").caption == "a photo of a white ring on a speckled black background"


@pytest.mark.parametrize("shape", ["circle", "square", "cross"])
def test_the_object_is_drawn_in_its_colour_on_the_background(shape):
    scene = Scene(shape=shape, colour="yellow", background="purple", size=0.3, x=0.5, y=0.5)
    pixels = np.asarray(render(scene)).astype(int)
    assert np.abs(pixels[16, 16] - COLOURS["yellow"]).max() <= 1
    assert np.abs(pixels[1, 1] - COLOURS["purple"]).max() <= 1


def test_shapes_have_distinct_silhouettes():
    scene = Scene(shape="circle", colour="red", background="blue", size=0.4)
    masks = {name: shape_mask(name, scene) > 0.5 for name in SHAPES}
    for a in SHAPES:
        assert masks[a].sum() > 40, a
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)


def test_rotation_turns_the_shape_and_the_pattern():
    upright = Scene(shape="triangle", colour="red", background="blue", size=0.4)
    turned = Scene(shape="triangle", colour="red", background="blue", size=0.4, angle=180)
    assert not np.array_equal(shape_mask("triangle", upright), shape_mask("triangle", turned))
    stripes = pattern_fill(upright, "stripes", ("red", "white"))
    assert {tuple(p) for p in stripes.reshape(-1, 3).astype(int)} == {COLOURS["red"], COLOURS["white"]}
    assert not np.array_equal(stripes, pattern_fill(Scene("triangle", "red", "blue", size=0.4, angle=90), "stripes", ("red", "white")))


def test_to_pixels_gives_the_vae_range():
    pixels = to_pixels([render(Scene("star", "white", "black"))])
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.8 and pixels.min() < -0.8
