import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from dreambooth_moslora.tiny import save_tiny_sdxl_pipeline


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
