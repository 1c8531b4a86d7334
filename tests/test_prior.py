from PIL import Image

from pathlib import Path

from dreambooth_moslora.trainer.data import Example
from dreambooth_moslora.trainer.prior import base_model_prior_examples, count_images, generate_class_images, missing_class_indices
from helpers import write_images


def test_missing_indices_skip_existing_names(tmp_path):
    assert missing_class_indices(tmp_path / "new", 3) == [0, 1, 2]
    write_images(tmp_path, sizes=((8, 8),))
    Image.new("RGB", (8, 8)).save(tmp_path / "class-00001.png")
    assert count_images(tmp_path) == 2
    assert missing_class_indices(tmp_path, 5) == [0, 2, 3]
    assert missing_class_indices(tmp_path, 2) == []


def test_generated_images_are_seeded_per_index(tiny_pipe, tmp_path):
    prompts = ["a photo of a dog", "a photo of a dog on the beach"]
    generate_class_images(tiny_pipe, tmp_path / "a", prompts, [0, 1, 2], batch_size=2, resolution=64,
                          num_inference_steps=2, seed=0, show_progress=False)
    generate_class_images(tiny_pipe, tmp_path / "b", prompts, [2], batch_size=1, resolution=64,
                          num_inference_steps=2, seed=0, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    captions = [(tmp_path / "a" / f"class-0000{i}.txt").read_text().strip() for i in range(3)]
    assert captions == [prompts[0], prompts[1], prompts[0]]  # cycled, each image's own prompt kept
    same = [Image.open(tmp_path / d / "class-00002.png").tobytes() for d in ("a", "b")]
    assert same[0] == same[1]
    assert Image.open(tmp_path / "a" / "class-00000.png").size == (64, 64)


def test_base_model_prior_examples_are_the_instance_images_with_the_trigger_taken_out():
    instance = [Example(Path("a.png"), "a photo of sks dog", (64, 64), (64, 64)),
                Example(Path("b.png"), "a photo of sks dog on a sks beach", (64, 64), (64, 64))]
    classes = base_model_prior_examples(instance, "a photo of sks dog", "a photo of a dog")
    assert [c.caption for c in classes] == ["a photo of dog", "a photo of dog on a beach"]
    assert [c.path for c in classes] == [e.path for e in instance] and all(c.is_class for c in classes)
    several = base_model_prior_examples(instance, "a photo of sks dog", "a photo of a dog",
                                        ["a photo of a dog", "a dog in the snow", "a dog on a sofa"])
    assert [(c.path.name, c.caption) for c in several] == [
        ("a.png", "a photo of a dog"), ("b.png", "a dog in the snow"), ("a.png", "a dog on a sofa")]


def test_base_model_prior_takes_out_only_the_trigger_not_the_words_the_class_prompt_lacks():
    instance = [Example(Path("a.png"), "a photo of sks dog", (64, 64), (64, 64)),
                Example(Path("b.png"), "Sks dog, on a beach", (64, 64), (64, 64))]
    classes = base_model_prior_examples(instance, "a photo of sks dog", "a photo of a puppy")
    assert [c.caption for c in classes] == ["a photo of dog", "dog, on a beach"]
