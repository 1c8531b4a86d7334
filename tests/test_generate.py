import json

import pytest
from PIL import Image

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.pipeline.generate import GenerationSettings, generate_images, load_pipeline

SETTINGS = GenerationSettings(num_images_per_prompt=2, seed=7, num_inference_steps=2, scheduler="euler_a")


def test_images_are_named_by_prompt_and_seed_carry_their_settings_and_repeat(trained, tiny_sdxl_dir, tmp_path):
    pipe = load_pipeline(str(tiny_sdxl_dir), trained["dir"], SETTINGS, device="cpu")
    paths = generate_images(pipe, ["a photo of sks dog", "a sks dog in the snow"], SETTINGS, tmp_path / "a",
                            adapter_name="my-adapter", show_progress=False)
    assert [p.name for p in paths] == ["000-7.png", "000-8.png", "001-7.png", "001-8.png"]
    image = Image.open(paths[2])
    assert image.text["parameters"].startswith("a sks dog in the snow\nSteps: 2, Sampler: euler_a")
    settings = json.loads(image.text["dreambooth_moslora"])
    assert settings["seed"] == 7 and settings["adapter"] == "my-adapter"
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (2 * 64, 2 * 64)
    again = generate_images(pipe, ["a sks dog in the snow"], SETTINGS, tmp_path / "b", show_progress=False)
    assert Image.open(again[0]).tobytes() == Image.open(paths[2]).tobytes()  # same seed, same image
    assert Image.open(again[0]).tobytes() != Image.open(paths[3]).tobytes()


def test_batched_images_are_each_seeds_own_image(trained, tiny_sdxl_dir, tmp_path):
    import dataclasses

    import numpy as np

    pipe = load_pipeline(str(tiny_sdxl_dir), trained["dir"], SETTINGS, device="cpu")
    calls = []
    original_call = type(pipe).__call__

    def counting_call(self, prompt, **kwargs):
        calls.append(list(prompt))
        return original_call(self, prompt, **kwargs)

    prompts = ["a photo of sks dog", "a sks dog in the snow"]
    one = generate_images(pipe, prompts, SETTINGS, tmp_path / "one", show_progress=False)
    type(pipe).__call__ = counting_call
    try:
        batched = generate_images(pipe, prompts, dataclasses.replace(SETTINGS, batch_size=3), tmp_path / "three",
                                  show_progress=False)
    finally:
        type(pipe).__call__ = original_call
    assert calls == [[prompts[0], prompts[0], prompts[1]], [prompts[1]]]
    assert [p.name for p in batched] == [p.name for p in one]
    for a, b in zip(one, batched):  # euler_a draws noise every step: each image keeps its own generator
        assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() <= 1

def test_fused_sampling_matches_unfused(trained, tiny_sdxl_dir, tmp_path):
    import numpy as np

    images = []
    for fuse in (False, True):
        settings = GenerationSettings(num_inference_steps=2, fuse=fuse)
        pipe = load_pipeline(str(tiny_sdxl_dir), trained["dir"], settings, device="cpu")
        path = generate_images(pipe, ["a photo"], settings, tmp_path / str(fuse), show_progress=False)[0]
        images.append(np.asarray(Image.open(path), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_bad_model_and_scheduler_names(tiny_sdxl_dir, tmp_path):
    with pytest.raises(UserInputError, match="model folder not found"):
        load_pipeline(str(tmp_path / "nothing"), None, SETTINGS, device="cpu")
    with pytest.raises(UserInputError, match="unknown scheduler 'fast'"):
        load_pipeline(str(tiny_sdxl_dir), None, GenerationSettings(scheduler="fast"), device="cpu")
