"""The dataset file: what it reads, each mistake as one line naming the concept and the key, and the file the
single-folder flags mean (--print_dataset_config), read back to the same concepts."""

import re

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.dataset_config import Concept, dataset_toml, load_dataset_config
from helpers import write_images

BASE = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0", "--report_to", "none"]


@pytest.fixture
def folders(tmp_path):
    for name in ("dog", "cat", "reg", "held-out", "masks"):
        write_images(tmp_path / name, sizes=((64, 64),))
    return tmp_path


def write(folder, text):
    path = folder / "dataset.toml"
    path.write_text(text)
    return path


TWO_SUBJECTS = """
[[concept]]
name = "dog"
image_dir = "dog"
instance_prompt = "a photo of sks dog"
repeats = 3
loss_weight = 0.5
mask_dir = "masks"
prior = "base_model"
class_prompt = "a photo of a dog"

[[concept]]
image_dir = "cat"
instance_prompt = "a photo of zwx cat"
caption_extension = "none"

[[concept]]
role = "class"
image_dir = "reg"
class_prompt = "a photo of a cat"
repeats = 2

[[concept]]
role = "validation"
image_dir = "held-out"
validates = "cat"
"""


def test_a_file_reads_every_key_with_paths_relative_to_it(folders):
    dataset = load_dataset_config(write(folders, TWO_SUBJECTS))
    dog, cat, reg, held_out = dataset.concepts
    assert dog == Concept(name="dog", image_dir=folders / "dog", instance_prompt="a photo of sks dog", repeats=3,
                          loss_weight=0.5, mask_dir=folders / "masks", prior="base_model",
                          class_prompt="a photo of a dog")
    assert (cat.name, cat.caption_extension, cat.repeats, cat.prior) == ("cat", "none", 1, "none")
    assert (reg.role, reg.repeats, reg.class_prompt) == ("class", 2, "a photo of a cat")
    assert (held_out.role, held_out.validates) == ("validation", "cat")
    assert dataset.instance_prompts == ["a photo of sks dog", "a photo of zwx cat"]
    assert dataset.base_model_prior
    dog_measured, cat_measured = dataset.measured_subjects()  # the cat against its held-out photos, the shared class
    assert (dog_measured.instance_prompt, dog_measured.reference_dir, dog_measured.class_prompt) == (
        "a photo of sks dog", folders / "dog", "a photo of a dog")
    assert (cat_measured.name, cat_measured.reference_dir, cat_measured.class_prompt) == (
        "cat", held_out.image_dir, "a photo of a cat")


def test_a_file_written_out_reads_back_to_the_same_concepts(folders):
    dataset = load_dataset_config(write(folders, TWO_SUBJECTS))
    (folders / "elsewhere").mkdir()
    assert load_dataset_config(write(folders / "elsewhere", dataset_toml(dataset))) == dataset


def test_a_validation_concept_holds_out_its_subjects_photos_for_measured_validation(folders):
    dataset = load_dataset_config(write(folders, """
[[concept]]
image_dir = "dog"
instance_prompt = "a photo of sks dog"
[[concept]]
role = "validation"
image_dir = "held-out"
"""))
    assert dataset.concepts[1].validates == "dog"  # the only subject
    assert dataset.measured_subjects()[0].reference_dir == folders / "held-out"


def test_class_prompts_give_the_class_prompt_as_the_flag_does(folders):
    dataset = load_dataset_config(write(folders, """
[[concept]]
image_dir = "dog"
instance_prompt = "a photo of sks dog"
prior = "base_model"
class_prompts = ["a photo of a dog", "a photo of a puppy"]
"""))
    assert dataset.concepts[0].class_prompt == "a photo of a dog"


ONE = '[[concept]]\nname = "dog"\nimage_dir = "dog"\ninstance_prompt = "a photo of sks dog"\n'


@pytest.mark.parametrize("text, message", [
    (ONE + "repeat = 2\n", "concept 'dog': unknown key 'repeat'; did you mean 'repeats'?"),
    (ONE + "validates = 'cat'\n", "concept 'dog': unknown key 'validates' (a key of validation concepts)"),
    ('[[concepts]]\nimage_dir = "dog"\n', "unknown table 'concepts'; did you mean 'concept'?"),
    ("title = 'x'\n", "unknown table 'title'"),
    ("", "no [[concept]] tables"),
    ("[[concept]\n", "not a TOML file"),
    ('[[concept]]\nname = "dog"\nimage_dir = "dog"\n', "concept 'dog': instance_prompt is missing"),
    ('[[concept]]\nname = "dog"\nimage_dir = "nowhere"\ninstance_prompt = "a photo of sks dog"\n',
     "concept 'dog': image_dir .*nowhere is not a folder"),
    (ONE + "mask_dir = 'nowhere'\n", "concept 'dog': mask_dir .*nowhere is not a folder"),
    (ONE + "repeats = 0\n", "concept 'dog': repeats must be at least 1, got 0"),
    (ONE + "repeats = -2\n", "concept 'dog': repeats must be at least 1, got -2"),
    (ONE + "repeats = 1.5\n", "concept 'dog': repeats must be a whole number, got 1.5"),
    (ONE + "repeats = '2'\n", "concept 'dog': repeats must be a whole number, got '2'"),
    (ONE + "loss_weight = -1\n", "concept 'dog': loss_weight must be a finite number, not negative, got -1"),
    (ONE + "loss_weight = nan\n", "concept 'dog': loss_weight must be a finite number, not negative, got nan"),
    (ONE + "loss_weight = inf\n", "concept 'dog': loss_weight must be a finite number, not negative, got inf"),
    (ONE + "prior = 'base_model'\nclass_prompt = 'a dog'\nprior_loss_weight = nan\n",
     "concept 'dog': prior_loss_weight must be a finite number"),
    ('[[concept]]\nname = "dog"\nimage_dir = "dog"\ninstance_prompt = " "\n', "concept 'dog': instance_prompt is empty"),
    (ONE + "prior = 'base_model'\nclass_prompt = ''\nclass_prompts = ['a dog']\n", "concept 'dog': class_prompt is empty"),
    (ONE + "prior = 'base_model'\nclass_prompts = ['a dog', '']\n", "concept 'dog': class_prompts is empty"),
    (ONE + "class_data_dir = 'reg'\nclass_prompt = 'a dog'\n",  # prior = "class_images" forgotten
     "concept 'dog': class_data_dir is unused with prior 'none'; set prior = \"class_images\", or remove it"),
    (ONE + "prior = 'base_model'\nclass_prompt = 'a dog'\nnum_class_images = 5\n",
     "concept 'dog': num_class_images is unused with prior 'base_model'"),
    (ONE + "alpha_mask = 1\n", "concept 'dog': alpha_mask must be true or false"),
    (ONE + "class_prompts = 'a dog'\n", "concept 'dog': class_prompts must be a list of strings"),
    (ONE + "caption_extension = 'txt'\n", "concept 'dog': caption_extension must start with a dot"),
    (ONE + "mask_dir = 'masks'\nalpha_mask = true\n", "concept 'dog': mask_dir and alpha_mask both give masks"),
    (ONE + "role = 'teacher'\n", "concept 'dog': role 'teacher' is not one of instance, class, validation"),
    (ONE + "prior = 'classes'\n", "concept 'dog': prior 'classes' is not one of none, class_images, base_model"),
    (ONE + "prior = 'base_model'\n", "concept 'dog': prior 'base_model' needs class_prompt"),
    (ONE + "prior = 'class_images'\nclass_prompt = 'a dog'\n", "concept 'dog': prior \"class_images\" needs class_data_dir"),
    (ONE + ONE.replace("a photo of sks dog", "a photo of zwx dog"), "concept 'dog': name used by 2 concepts"),
    (ONE + '[[concept]]\nname = "cat"\nimage_dir = "cat"\ninstance_prompt = "a photo of sks cat"\n',
     "concept 'cat': instance_prompt's trigger 'sks' is used by concept 'dog' too"),
    ('[[concept]]\nrole = "class"\nimage_dir = "reg"\nclass_prompt = "a dog"\n', "no instance concept"),
    (ONE + "prior = 'base_model'\nclass_prompt = 'a dog'\n"
     '[[concept]]\nname = "reg"\nrole = "class"\nimage_dir = "reg"\nclass_prompt = "a dog"\n',
     "concept 'reg': no subject uses these class images"),
    (ONE + '[[concept]]\nimage_dir = "cat"\ninstance_prompt = "a photo of zwx cat"\n'
     '[[concept]]\nrole = "validation"\nimage_dir = "held-out"\n', "concept 'held-out': validates is missing"),
    (ONE + '[[concept]]\nrole = "validation"\nimage_dir = "held-out"\nvalidates = "dgo"\n',
     "concept 'held-out': validates 'dgo' is not an instance concept; did you mean 'dog'?"),
], ids=lambda value: value.splitlines()[-1][:40] if "\n" in value else None)
def test_every_mistake_is_one_line_naming_the_concept_and_the_key(folders, text, message):
    path = write(folders, text)
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))  # the messages are text, .* a path
    with pytest.raises(UserInputError, match=pattern) as raised:
        load_dataset_config(path)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(f"--dataset_config {path}")


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        load_dataset_config(tmp_path / "nope.toml")


def test_beside_a_file_the_data_flags_are_refused_and_without_one_they_are_needed(folders):
    path = write(folders, ONE)
    with pytest.raises(UserInputError, match="put --repeats into its concepts"):
        parse_args([*BASE, "--dataset_config", str(path), "--repeats", "3"])
    with pytest.raises(UserInputError, match=r"--instance_data_dir is missing \(or give a --dataset_config file\)"):
        parse_args(BASE)
    with pytest.raises(UserInputError, match="--instance_prompt is missing"):
        parse_args([*BASE, "--instance_data_dir", str(folders / "dog")])
    args = parse_args([*BASE, "--dataset_config", str(path), "--resolution", "512"])  # other flags stay flags
    assert args.dataset.concepts[0].image_dir == folders / "dog" and args.resolution == 512


@pytest.mark.parametrize("weight", ["nan", "inf", "-1"])
def test_the_flags_prior_loss_weight_is_checked_as_a_files_is(folders, weight):
    with pytest.raises(UserInputError, match=f"--prior_loss_weight must be a finite number, not negative, got {weight}"):
        parse_args([*BASE, "--instance_data_dir", str(folders / "dog"), "--instance_prompt", "a photo of sks dog",
                    "--with_prior_preservation", "--prior_preservation_mode", "base_model", "--class_prompt",
                    "a photo of a dog", "--prior_loss_weight", weight])


def test_train_trigger_embedding_may_name_any_subjects_trigger(folders):
    path = write(folders, ONE + '[[concept]]\nimage_dir = "cat"\ninstance_prompt = "a photo of zwx cat"\n')
    assert parse_args([*BASE, "--dataset_config", str(path), "--train_trigger_embedding", "zwx"])
    with pytest.raises(UserInputError, match="'ohwx' is not a word of the instance prompt 'a photo of sks dog' or 'a"):
        parse_args([*BASE, "--dataset_config", str(path), "--train_trigger_embedding", "ohwx"])


@pytest.mark.parametrize("flags", [
    ["--repeats", "4", "--alpha_mask"],
    ["--mask_dir", "{masks}", "--with_prior_preservation", "--class_data_dir", "{reg}", "--class_prompt",
     "a photo of a dog", "--num_class_images", "7", "--prior_loss_weight", "0.5"],
    ["--with_prior_preservation", "--prior_preservation_mode", "base_model", "--class_prompts_file", "{prompts}"],
], ids=["repeats-alpha", "class-images", "base-model-prompts-file"])
def test_print_dataset_config_writes_the_file_the_flags_mean(folders, capsys, flags):
    (folders / "prompts.txt").write_text("a photo of a dog\na photo of a puppy \"x\"\n")
    flags = [f.format(masks=folders / "masks", reg=folders / "reg", prompts=folders / "prompts.txt") for f in flags]
    argv = [*BASE, "--instance_data_dir", str(folders / "dog"), "--instance_prompt", "a photo of sks dog", *flags]
    with pytest.raises(SystemExit) as exited:
        parse_args([*argv, "--print_dataset_config"])
    assert exited.value.code == 0
    (folders / "printed").mkdir()
    printed = write(folders / "printed", capsys.readouterr().out)
    assert load_dataset_config(printed) == parse_args(argv).dataset


def test_two_subjects_with_other_class_prompts_in_one_class_folder_are_refused(tmp_path):
    """The second once trained on the first one's class images and captions."""
    for name in ("dog", "cat", "classes"):
        (tmp_path / name).mkdir()
    subject = ('[[concept]]\nname = "{name}"\nimage_dir = "{name}"\ninstance_prompt = "a photo of {trigger} {name}"\n'
               'prior = "class_images"\nclass_prompt = "a photo of a {cls}"\nclass_data_dir = "classes"\n')
    path = tmp_path / "dataset.toml"
    path.write_text(subject.format(name="dog", trigger="sks", cls="dog") + subject.format(name="cat", trigger="zwx",
                                                                                        cls="cat"))
    with pytest.raises(UserInputError, match="concepts 'dog' and 'cat' share class_data_dir"):
        load_dataset_config(path)
    path.write_text(subject.format(name="dog", trigger="sks", cls="dog") + subject.format(name="cat", trigger="zwx",
                                                                                        cls="dog"))
    assert len(load_dataset_config(path).of_role("instance")) == 2  # one class, one folder: shared as it should be
