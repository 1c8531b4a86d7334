"""The trainer's accelerator path, simulated on the CPU: what reaches the device, in which dtype, and when."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from conftest import training_argv
from dreambooth_moslora.adapter.inject import moslora_parameters
from dreambooth_moslora.trainer import setup as trainer_setup
from dreambooth_moslora.trainer import train as train_module
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.data import read_examples
from dreambooth_moslora.trainer.fp8 import FP8
from dreambooth_moslora.trainer.memory_plan import configs_of, plan_memory, plan_settings
from dreambooth_moslora.trainer.meta_memory import LiveTensorBytes
from helpers import write_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
META = torch.device("meta")


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((64, 64),) * 3)
    return tmp_path / "subject"


def _frozen_models(models):
    return (models.unet, *models.text_encoders, models.vae)


@pytest.mark.parametrize("extra", [(), ("--base_weights_dtype", "fp8")])
def test_setup_moves_each_model_to_the_device_once_already_in_its_training_dtype(tiny_sdxl_dir, subject, tmp_path,
                                                                                 monkeypatch, extra):
    """The meta device stands in for the card: every byte that lands there is counted, and the peak may exceed
    the plan's weights by one layer at most (an fp32 UNet moved and then cast would be twice them)."""
    args = parse_args(training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--mixed_precision", "bf16", *extra))
    accelerator = SimpleNamespace(device=META, mixed_precision="bf16", is_main_process=True)
    on_device_when_planned = []
    monkeypatch.setattr(trainer_setup, "report_memory_plan", lambda args, accelerator, models, examples:
                        on_device_when_planned.append(any(p.is_meta for m in _frozen_models(models)
                                                          for p in m.parameters())))
    load = trainer_setup.load_base_models

    def load_uncounted(*args, **kwargs):  # loaders build skeletons on the meta device: not the card's bytes
        with _disable_current_modes():
            return load(*args, **kwargs)

    monkeypatch.setattr(trainer_setup, "load_base_models", load_uncounted)
    instance = read_examples(subject, args.instance_prompt, args.resolution, args.bucketing)
    counter = LiveTensorBytes(device="meta")
    with counter:
        models, adapted = trainer_setup.setup_models(args, accelerator, instance)

    assert on_device_when_planned == [False]  # the card check runs before anything reaches the card
    assert all(p.is_meta for m in _frozen_models(models) for p in m.parameters())
    adapter = {id(p) for p in moslora_parameters(models.unet)}
    frozen_unet = {p.dtype for p in models.unet.parameters() if id(p) not in adapter}
    assert frozen_unet == ({torch.bfloat16, FP8} if extra else {torch.bfloat16})
    assert {p.dtype for p in moslora_parameters(models.unet)} == {torch.float32}
    assert {p.dtype for e in models.text_encoders for p in e.parameters()} == {torch.bfloat16}
    assert models.vae.dtype == torch.float32  # the stock VAE overflows in fp16
    plan = plan_memory(configs_of(models), plan_settings(args, instance, mixed_precision="bf16"))
    largest_layer = max(p.numel() * 4 for m in _frozen_models(models) for p in m.parameters())
    assert plan.setup_weights <= counter.peak <= plan.setup_weights + largest_layer, (counter.peak, plan.setup_weights)


def test_validation_images_decode_outside_the_trainings_autocast(tiny_sdxl_dir, subject, tmp_path, monkeypatch):
    """Under fp16 autocast the stock VAE overflows: sampling keeps the autocast, the decoder runs without it in
    its own fp32 (bf16 autocast is what a CPU runs, and shows the same dtype path)."""
    decoded = []
    load = trainer_setup.load_base_models

    def load_and_watch_the_decoder(*args, **kwargs):
        models = load(*args, **kwargs)
        models.vae.decoder.conv_in.register_forward_hook(lambda module, inputs, output: decoded.append(output.dtype))
        return models

    monkeypatch.setattr(trainer_setup, "load_base_models", load_and_watch_the_decoder)
    train_module.train(parse_args(training_argv(
        tiny_sdxl_dir, subject, tmp_path / "out", "--mixed_precision", "bf16", "--validation_prompt", "sks dog",
        "--num_validation_images", "1", "--num_inference_steps", "2", steps=1)))
    assert decoded and set(decoded) == {torch.float32}
