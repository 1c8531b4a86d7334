import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:  # one thread per worker (and per process a test starts): no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from dreambooth_moslora.pipeline.tiny import save_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture
def tiny_pipe(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt="a photo of sks dog", seed=0):
    """A deterministic 64 px image as a tensor, for comparing adapters."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images
    return torch.from_numpy(images)


def perturb_adapters(model, seed=0, std=0.5):
    """Random non-zero A, M and B, so a test cannot pass on an adapter that does nothing."""
    from dreambooth_moslora import moslora_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moslora_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture
def fresh_accelerate():
    """In-process training runs each build an Accelerator; accelerate keeps one state per process."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def training_argv(base_dir, instance_dir, output_dir, *extra, steps=2):
    """A small, fast training command on the tiny pipeline (steps=None leaves the step count to epochs)."""
    return [
        "--pretrained_model_name_or_path", str(base_dir),
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", "a photo of sks dog",
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        *(("--max_train_steps", str(steps)) if steps else ()),
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_sdxl_dir):
    """An adapted pipeline with random non-zero adapters (UNet and both text encoders), saved and exported."""
    from dreambooth_moslora import MoSLoRAConfig, export_diffusers, export_kohya, inject_moslora, save_moslora
    from dreambooth_moslora.adapter.config import TEXT_ENCODER_TARGETS
    from dreambooth_moslora.adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    base_image = sample(pipe)
    inject_moslora(pipe.unet, MoSLoRAConfig(rank=4, alpha=2))
    text_config = MoSLoRAConfig(rank=2, mixer_init="kaiming", target_modules=TEXT_ENCODER_TARGETS)
    inject_moslora(pipe.text_encoder, text_config)
    inject_moslora(pipe.text_encoder_2, text_config)
    for seed, model in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        perturb_adapters(model, seed=seed, std=0.3)
    out = tmp_path_factory.mktemp("adapter")
    save_moslora(out / NATIVE_FILE, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, base_model="tiny")
    export_diffusers(out / NATIVE_FILE, out / DIFFUSERS_FILE)
    export_kohya(out / NATIVE_FILE, out / KOHYA_FILE)
    return {"dir": out, "pipe": pipe, "image": sample(pipe), "base_image": base_image}


@pytest.fixture(scope="session")
def feature_models(tmp_path_factory):
    from helpers import save_tiny_feature_models

    return save_tiny_feature_models(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def world_tokenizer():
    from dreambooth_moslora.world.vocabulary import build_world_tokenizer

    return build_world_tokenizer()


@pytest.fixture(scope="session")
def untrained_mini_dir(tmp_path_factory):
    """The mini SDXL before pretraining: the world's architecture and tokenizer, random weights."""
    from dreambooth_moslora.world.model import build_mini_sdxl_pipeline

    path = tmp_path_factory.mktemp("mini-sdxl")
    build_mini_sdxl_pipeline(seed=0).save_pretrained(path)
    return path
