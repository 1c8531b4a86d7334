import copy

import pytest
import torch
from torch import nn

from conftest import training_argv
from dreambooth_moslora import MoSLoRAConfig, inject_moslora
from dreambooth_moslora.arguments import parse_args
from dreambooth_moslora.fp8 import FP8, Fp8Conv2d, Fp8Linear, store_frozen_weights_in_fp8
from dreambooth_moslora.io import NATIVE_FILE, read_moslora
from dreambooth_moslora.memory_plan import PlanSettings, model_configs, plan_memory
from dreambooth_moslora.train import train
from helpers import write_images


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(3, 5, 3, padding=1, stride=2)])
def test_an_fp8_layer_computes_with_its_upcast_weight_and_gives_the_same_input_gradient(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 9, 9)
    layer.requires_grad_(False)
    reference = copy.deepcopy(layer)
    store_frozen_weights_in_fp8(layer)
    assert layer.weight.dtype == FP8 and isinstance(layer, (Fp8Linear, Fp8Conv2d))
    assert reference.weight.dtype == torch.float32 and type(reference) in (nn.Linear, nn.Conv2d)
    reference.weight.data = layer.weight.to(torch.float32)  # the same rounded weight, in an ordinary layer
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(ours).square().sum().backward()
    reference(theirs).square().sum().backward()
    assert torch.allclose(layer(x), reference(x), atol=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-5)


def test_only_frozen_weights_go_to_fp8_and_the_adapter_stays_fp32(tiny_pipe):
    unet = tiny_pipe.unet
    inject_moslora(unet, MoSLoRAConfig(rank=4))
    changed = store_frozen_weights_in_fp8(unet)
    frozen = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert changed == len(frozen) and all(m.weight.dtype == FP8 for m in frozen)
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    reflected = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    assert store_frozen_weights_in_fp8(reflected) == 0 and reflected.weight.dtype == torch.float32


def test_training_on_fp8_base_weights_learns_and_the_plan_halves_the_unet(tiny_sdxl_dir, tmp_path, fresh_accelerate):
    write_images(tmp_path / "instance")
    argv = training_argv(tiny_sdxl_dir, tmp_path / "instance", tmp_path / "out", "--base_weights_dtype", "fp8",
                         "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1",
                         "--num_inference_steps", "2", steps=3)
    result = train(parse_args(argv))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    adapter = read_moslora(tmp_path / "out" / NATIVE_FILE)
    assert any(m.lora_B.abs().sum() > 0 for m in adapter.modules["unet"].values())
    configs = model_configs(str(tiny_sdxl_dir))
    plain = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="bf16"))
    fp8 = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="bf16", base_weights_fp8=True))
    assert fp8.weights["UNet"] < 0.55 * plain.weights["UNet"]
