import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from helpers import write_images
from PIL import Image
from original_layout import save_original_sdxl
from safetensors.torch import load_file, save_file

from conftest import sample, training_argv
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.adapter.io import NATIVE_FILE, read_moslora
from dreambooth_moslora.pipeline.generate import GenerationSettings, load_pipeline
from dreambooth_moslora.pipeline.single_file import (base_model_sha256, check_single_file, load_single_file_components,
                                                     open_clip_to_transformers)
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.train import train
from dreambooth_moslora.verbs.inspection import format_report, inspect_adapter

MINI_SDXL = Path(__file__).resolve().parents[1] / "assets" / "mini-sdxl"


@pytest.fixture(scope="module")
def single_file(tiny_sdxl_dir, tmp_path_factory):
    """The tiny pipeline as one original-layout file, and a config folder without any weights in it."""
    folder = tmp_path_factory.mktemp("single-file")
    path = save_original_sdxl(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir), folder / "tiny-sdxl.safetensors")
    configs = shutil.copytree(tiny_sdxl_dir, folder / "configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return path, configs


def _assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_our_open_clip_reader_agrees_with_diffusers_own_conversion(tiny_sdxl_dir, single_file):
    """The writer and the reader are ours; diffusers' converter is an independent statement of the layout."""
    weights = load_file(str(single_file[0]))
    text_encoder_2 = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).text_encoder_2
    prefix = "conditioner.embedders.1.model."
    theirs = convert_open_clip_checkpoint(text_encoder_2, weights, prefix=prefix)
    ours = open_clip_to_transformers({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("base", ["tiny", "mini"])
def test_every_component_from_the_file_equals_the_folder(tiny_sdxl_dir, base, tmp_path):
    folder = tiny_sdxl_dir if base == "tiny" else MINI_SDXL
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    path = save_original_sdxl(pipe, tmp_path / "model.safetensors")
    components = load_single_file_components(path, folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(components[name], getattr(pipe, name))
    tokens = pipe.tokenizer_2(["a photo of a red star"], return_tensors="pt").input_ids
    pooled = components["text_encoder_2"](tokens).text_embeds  # diffusers 0.42 leaves this projection on meta
    assert torch.equal(pooled, pipe.text_encoder_2(tokens).text_embeds)


def test_a_given_vae_replaces_the_files_own(tiny_sdxl_dir, single_file):
    vae = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).vae
    assert load_single_file_components(*single_file, vae=vae)["vae"] is vae


def test_a_clip_l_without_the_text_model_level_still_loads_every_weight(tiny_sdxl_dir, tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    path = save_original_sdxl(pipe, tmp_path / "model.safetensors", clip_l_text_model_level=False)
    assert not any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in load_file(str(path)))
    _assert_same_weights(load_single_file_components(path, tiny_sdxl_dir)["text_encoder"], pipe.text_encoder)


def test_images_from_the_file_equal_the_folders(tiny_sdxl_dir, single_file, trained):
    path, configs = single_file
    settings = GenerationSettings()
    for adapter in (None, trained["dir"]):
        from_file = load_pipeline(str(path), adapter, settings, device="cpu", model_config=str(configs))
        from_folder = load_pipeline(str(tiny_sdxl_dir), adapter, settings, device="cpu")
        for pipe in (from_file, from_folder):
            pipe.set_progress_bar_config(disable=True)
        image = sample(from_file)
        assert torch.isfinite(image).all()
        assert torch.equal(image, sample(from_folder))


def test_training_on_the_file_gives_the_folders_adapter_records_the_file_and_refuses_another(
        tiny_sdxl_dir, single_file, tmp_path, fresh_accelerate):
    path, configs = single_file
    instance = tmp_path / "instance"
    write_images(instance)
    common = ("--train_text_encoder", "--with_prior_preservation", "--class_prompt", "a photo of a dog",
              "--num_class_images", "2", "--sample_batch_size", "2", "--num_inference_steps", "2",
              "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1")
    runs = {}
    for name, base, extra in (("folder", tiny_sdxl_dir, ()), ("file", path, ("--model_config", str(configs)))):
        argv = training_argv(base, instance, tmp_path / name, "--class_data_dir", str(tmp_path / f"class-{name}"),
                             *common, *extra, steps=3)
        train(parse_args(argv))
        fresh_accelerate_state()
        runs[name] = tmp_path / name
    class_images = [sorted((tmp_path / f"class-{n}").glob("*.png")) for n in ("folder", "file")]
    assert [np.asarray(Image.open(p)).tolist() for p in class_images[0]] == [
        np.asarray(Image.open(p)).tolist() for p in class_images[1]]
    from_folder, from_file = (load_file(str(runs[n] / NATIVE_FILE)) for n in ("folder", "file"))
    assert from_folder.keys() == from_file.keys()
    # The weights are bit-equal (test above), but CPU kernels round differently with the memory alignment of the
    # loaded tensors (measured: 7e-7 on a UNet output, 0 once both copies are re-allocated), which Adam's first
    # steps amplify; the adapters agree to that rounding, far below any real difference.
    assert max((from_folder[k] - from_file[k]).abs().max().item() for k in from_folder) <= 1e-5
    adapter = read_moslora(runs["file"] / NATIVE_FILE)
    assert adapter.base_model == str(path.resolve()) and adapter.base_model_sha256 == base_model_sha256(path)
    assert read_moslora(runs["folder"] / NATIVE_FILE).base_model_sha256 is None
    assert f"(sha256 {adapter.base_model_sha256})" in format_report(inspect_adapter(runs["file"]))
    card = (runs["file"] / "README.md").read_text()  # its snippet must not use diffusers' broken single-file path
    assert f'load_single_file_components("{path.resolve()}", "{configs.resolve()}"' in card

    other = tmp_path / "other.safetensors"  # another model: resuming on it is refused before it is loaded
    weights = load_file(str(path))
    weights["model.diffusion_model.out.2.bias"] = weights["model.diffusion_model.out.2.bias"] + 1
    save_file(weights, str(other))
    argv = training_argv(other, instance, runs["file"], "--model_config", str(configs), "--resume_from_checkpoint",
                         "latest", steps=4)
    with pytest.raises(UserInputError, match=r"checkpoint-3 was trained on a base model file with sha256"):
        train(parse_args(argv))


def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_an_adapter_is_refused_on_another_single_file_base(single_file, trained, tmp_path):
    path, configs = single_file
    adapter = tmp_path / NATIVE_FILE
    shutil.copy(trained["dir"] / NATIVE_FILE, adapter)
    native = read_moslora(adapter)
    assert native.base_model_sha256 is None  # trained on a folder: nothing to compare, it loads
    weights = load_file(str(adapter))
    from safetensors import safe_open
    with safe_open(str(adapter), "pt") as handle:
        metadata = {**handle.metadata(), "base_model_sha256": "0" * 64}
    save_file(weights, str(adapter), metadata=metadata)
    with pytest.raises(UserInputError, match="trained on a base model file with sha256 000000000000"):
        load_pipeline(str(path), adapter, device="cpu", model_config=str(configs))


@pytest.mark.parametrize("problem, message", [
    ("no_config", "is a single-file model: name a diffusers folder of the same architecture with --model_config"),
    ("pickle", "only .safetensors model files are loaded"),
    ("missing", "model file not found"),
    ("config_without_unet", "is not a diffusers SDXL folder: it has no unet"),
    ("not_sdxl", "is not an SDXL checkpoint in the original layout"),
])
def test_single_file_problems_are_one_clear_error(single_file, tmp_path, problem, message):
    path, configs = single_file
    model_config = str(configs)
    if problem == "no_config":
        model_config = None
    elif problem == "pickle":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"not loaded")
    elif problem == "missing":
        path = tmp_path / "absent.safetensors"
    elif problem == "config_without_unet":
        model_config = shutil.copytree(configs, tmp_path / "configs", ignore=shutil.ignore_patterns("unet"))
    elif problem == "not_sdxl":
        path = tmp_path / "lora.safetensors"
        save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserInputError, match=message):
        check_single_file(path, model_config)


def test_the_text_encoders_are_built_without_random_init(single_file):
    """Random init of weights the file replaces costs seconds for SDXL's OpenCLIP; it would draw random numbers."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    components = load_single_file_components(*single_file)
    assert torch.equal(torch.get_rng_state(), before)
    for name in ("text_encoder", "text_encoder_2"):
        assert not any(t.is_meta for t in [*components[name].parameters(), *components[name].buffers()])
