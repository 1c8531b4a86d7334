import numpy as np
from PIL import Image

from dreambooth_moslora.world.render import COLOURS, IMAGE_SIZE, SHAPES, Scene, shape_mask
from dreambooth_moslora.world.subjects import (DIAGNOSIS_SUBJECTS, SUBJECTS, TUNING_SUBJECTS, render_subject,
                                               subject_by_name, write_instance_images)


def _colour_share(image, colour) -> float:
    pixels = np.asarray(image).astype(int)
    return float((np.abs(pixels - COLOURS[colour]).max(axis=-1) <= 8).mean())


def test_there_are_three_novel_subjects_and_tuning_subjects_apart_from_them_named_after_world_classes():
    assert len(SUBJECTS) >= 3 and len(TUNING_SUBJECTS) >= 2
    assert not {s.name for s in SUBJECTS} & {s.name for s in TUNING_SUBJECTS}
    for subject in (*SUBJECTS, *TUNING_SUBJECTS):
        assert subject.class_noun in SHAPES
        assert subject.instance_prompt("sks") == f"a photo of a sks {subject.class_noun}"
        assert subject.class_prompt == f"a photo of a {subject.class_noun}"
        assert subject_by_name(subject.name) is subject


def test_diagnosis_subjects_are_recoloured_twins_of_a_tuned_or_reported_subject():
    names = {s.name for s in (*SUBJECTS, *TUNING_SUBJECTS)}
    for twin in DIAGNOSIS_SUBJECTS:
        assert subject_by_name(twin.name) is twin and twin.name not in names
        original = next(s for s in (*SUBJECTS, *TUNING_SUBJECTS) if s.outline == twin.outline)
        assert (original.class_noun, original.pattern) == (twin.class_noun, twin.pattern)
        assert not set(original.colours) & set(twin.colours)


def test_subject_silhouettes_are_not_world_shapes():
    scene = Scene(shape="circle", colour="red", background="blue", size=0.4)
    for subject in (*SUBJECTS, *TUNING_SUBJECTS):
        ours = shape_mask("circle", scene, outlines=subject.outline) > 0.5
        for shape in SHAPES:
            theirs = shape_mask(shape, scene) > 0.5
            assert (ours & theirs).sum() / (ours | theirs).sum() < 0.85, (subject.name, shape)


def test_instance_images_show_both_colours_on_another_background_and_are_reproducible(tmp_path):
    subject = SUBJECTS[0]
    paths = write_instance_images(subject, tmp_path / "a", count=5, seed=0)
    again = write_instance_images(subject, tmp_path / "b", count=5, seed=0)
    assert [p.name for p in paths] == [f"{i:02d}.png" for i in range(5)]
    for path, other in zip(paths, again):
        image = Image.open(path)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(other)))
        assert all(_colour_share(image, c) > 0.03 for c in subject.colours)
    backgrounds = {tuple(np.asarray(Image.open(p))[0, 0]) for p in paths}
    assert len(backgrounds) > 1


def test_a_named_background_is_used():
    image = render_subject(SUBJECTS[1], np.random.default_rng(0), background="red", texture="plain")
    assert np.abs(np.asarray(image)[0, 0].astype(int) - COLOURS["red"]).max() <= 1


def test_instance_masks_cover_exactly_the_subjects_pixels(tmp_path):
    subject = subject_by_name("striped-hexagram")
    paths = write_instance_images(subject, tmp_path / "photos", count=3, mask_folder=tmp_path / "masks")
    for path in paths:
        photo = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name))
        inside = photo[mask == 255]
        colours = np.array([COLOURS[c] for c in subject.colours], dtype=np.int16)
        nearest = np.abs(inside[:, None, :] - colours[None]).sum(-1).min(1)
        assert 0.05 < (mask == 255).mean() < 0.8 and np.percentile(nearest, 95) < 40
