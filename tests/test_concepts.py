"""A dataset file's concepts as training examples: captions, weights and masks per concept, the class set that
keeps each subject's class, and batches drawing the subjects in proportion to images × repeats."""

from collections import Counter

import pytest
from PIL import Image

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.concepts import read_concepts
from dreambooth_moslora.trainer.data import process_micro_batches
from dreambooth_moslora.trainer.dataset_config import load_dataset_config
from helpers import write_images

DATASET = """
[[concept]]
name = "dog"
image_dir = "dog"
instance_prompt = "a photo of sks dog"
caption_extension = ".caption"
repeats = 3
loss_weight = 0.5
alpha_mask = true
prior = "base_model"
class_prompt = "a photo of a dog"
prior_loss_weight = 0.25

[[concept]]
name = "cat"
image_dir = "cat"
instance_prompt = "a photo of zwx cat"
caption_extension = "none"

[[concept]]
name = "cats"
role = "class"
image_dir = "reg"
class_prompt = "a photo of a cat"
repeats = 2
loss_weight = 0.75

[[concept]]
role = "validation"
image_dir = "held-out"
validates = "cat"
"""


@pytest.fixture
def dataset(tmp_path):
    write_images(tmp_path / "dog", sizes=((64, 64), (64, 64)), suffix=".png")
    (tmp_path / "dog" / "00.caption").write_text("a photo of sks dog on a sofa")
    (tmp_path / "dog" / "00.txt").write_text("not this one: the dog's captions are .caption files")
    write_images(tmp_path / "cat", sizes=((64, 64),) * 5, seed=1)
    (tmp_path / "cat" / "00.txt").write_text("captions are off for the cat")
    write_images(tmp_path / "reg", sizes=((64, 64),) * 3, seed=2)
    write_images(tmp_path / "held-out", sizes=((64, 64),), seed=3)
    for path in (tmp_path / "dog").glob("*.png"):  # photos with an alpha channel, for the dog's masks
        Image.open(path).convert("RGBA").save(path)
    path = tmp_path / "dataset.toml"
    path.write_text(DATASET)
    return load_dataset_config(path)


def test_each_concept_reads_with_its_own_captions_weights_and_masks(dataset, tmp_path):
    data = read_concepts(dataset, resolution=64, bucketing=False)
    dog, cat = data.subjects
    assert [e.caption for e in dog] == ["a photo of sks dog on a sofa", "a photo of sks dog"]
    assert {e.caption for e in cat} == {"a photo of zwx cat"}
    assert {e.loss_weight for e in dog} == {0.5} and {e.loss_weight for e in cat} == {1.0}
    assert all(e.mask == e.path for e in dog) and all(e.mask is None for e in cat)
    assert len(data.shared_classes) == 6 and {e.loss_weight for e in data.shared_classes} == {0.75}  # 3 × repeats 2
    assert all(e.is_class and e.caption == "a photo of a cat" for e in data.shared_classes)
    held_out = tmp_path / "held-out" / "00.png"
    assert held_out not in {e.path for e in data.instance_examples + list(data.shared_classes)}


def test_each_subject_gets_its_class_set_and_epochs_follow_images_times_repeats(dataset):
    training_set = read_concepts(dataset, 64, False).training_set(make_class_images=pytest.fail)
    dog, cat = training_set.subjects
    assert (dog.repeats, dog.class_set, cat.repeats, cat.class_set) == (3, 0, 1, 1)
    own, shared = training_set.class_sets
    assert [e.caption for e in own] == ["a photo of dog on a sofa", "a photo of dog"]  # the trigger taken out
    assert all(e.base_model_target and e.loss_weight == 0.25 and e.mask is None for e in own)
    assert {e.caption for e in shared} == {"a photo of a cat"} and not any(e.base_model_target for e in shared)
    epoch = training_set.epoch(0)
    counts = Counter(_concept_of(e, dog, cat, own, shared) for e in epoch)
    assert counts == {"dog": 2 * 3, "dog's prior": 2 * 3, "cat": 5, "cat's class set": 5}


def test_batches_draw_the_concepts_in_proportion_to_images_times_repeats(dataset):
    training_set = read_concepts(dataset, 64, False).training_set(make_class_images=pytest.fail)
    dog, cat = training_set.subjects
    own, shared = training_set.class_sets
    stream = process_micro_batches(training_set, batch_size=2, seed=0, num_processes=1, process_index=0)
    per_epoch = len(training_set.epoch(0)) // 2
    drawn = Counter(_concept_of(e, dog, cat, own, shared) for _, (_, batch) in zip(range(4 * per_epoch), stream)
                    for e in batch)
    assert drawn["dog"] / drawn["cat"] == pytest.approx(6 / 5)
    assert drawn["dog's prior"] == drawn["dog"] and drawn["cat's class set"] == drawn["cat"]


def test_class_images_are_made_for_a_concept_before_they_are_read(tmp_path):
    write_images(tmp_path / "dog", sizes=((64, 64),))
    (tmp_path / "dataset.toml").write_text("""
[[concept]]
image_dir = "dog"
instance_prompt = "a photo of sks dog"
prior = "class_images"
class_prompt = "a photo of a dog"
class_data_dir = "classes"
num_class_images = 2
prior_loss_weight = 0.5
""")
    made = []

    def make_class_images(concept):
        made.append(concept.name)
        write_images(concept.class_data_dir, sizes=((64, 64),) * concept.num_class_images)

    data = read_concepts(load_dataset_config(tmp_path / "dataset.toml"), 64, False)
    (classes,) = data.training_set(make_class_images).class_sets
    assert made == ["dog"] and len(classes) == 2
    assert all(e.is_class and e.loss_weight == 0.5 and not e.base_model_target for e in classes)


def test_a_folder_without_photos_names_its_concept(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "dataset.toml").write_text('[[concept]]\nname = "dog"\nimage_dir = "empty"\ninstance_prompt = "sks"\n')
    with pytest.raises(UserInputError, match="dataset.toml: concept 'dog': no images in"):
        read_concepts(load_dataset_config(tmp_path / "dataset.toml"), 64, False)


def test_a_validation_folder_without_photos_is_found_before_any_model_loads(tmp_path):
    write_images(tmp_path / "dog", sizes=((64, 64),))
    (tmp_path / "held-out").mkdir()
    (tmp_path / "dataset.toml").write_text('[[concept]]\nname = "dog"\nimage_dir = "dog"\ninstance_prompt = "sks"\n'
                                           '[[concept]]\nrole = "validation"\nimage_dir = "held-out"\n')
    with pytest.raises(UserInputError, match="dataset.toml: concept 'held-out': no images in"):
        read_concepts(load_dataset_config(tmp_path / "dataset.toml"), 64, False)


def _concept_of(example, dog, cat, own, shared) -> str:
    if example in dog.examples:
        return "dog"
    if example in cat.examples:
        return "cat"
    return "dog's prior" if example in own else "cat's class set" if example in shared else "?"
