import math

import pytest
import torch
from torch import nn

from dreambooth_moslora import MoSLoRAConfig, MoSLoRALinear


def _layer(mixer_init="orthogonal", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(dtype)
    return MoSLoRALinear(base, MoSLoRAConfig(rank=4, alpha=8, mixer_init=mixer_init, **kwargs))


def _perturb(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_B.normal_()


@pytest.mark.parametrize("mixer_init", ["orthogonal", "kaiming", "identity", "none"])
def test_fresh_adapter_equals_base_exactly(mixer_init):
    layer = _layer(mixer_init)
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_low_rank_forward_matches_the_merged_dense_weight():
    layer = _layer()
    _perturb(layer)
    x = torch.randn(3, 5, 12)
    dense = layer.base_layer.weight + layer.delta_weight()
    expected = x @ dense.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_round_trips_and_merged_output_is_unchanged():
    layer = _layer()
    _perturb(layer)
    x = torch.randn(4, 12)
    original = layer.base_layer.weight.clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_merge_refuses_a_non_finite_result_and_leaves_the_weight():
    layer = _layer()
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    original = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, original) and not layer.merged


def test_mixer_inits():
    torch.testing.assert_close(_layer("identity").lora_mixer, torch.eye(4))
    mixer = _layer("orthogonal").lora_mixer
    torch.testing.assert_close(mixer @ mixer.T, torch.eye(4), rtol=0, atol=1e-5)
    kaiming = _layer("kaiming").lora_mixer
    assert kaiming.abs().max() <= 1 / math.sqrt(4) and kaiming.std() > 0
    assert _layer("none").lora_mixer is None


def test_a_inits():
    gaussian = MoSLoRALinear(nn.Linear(4096, 8), MoSLoRAConfig(rank=4)).lora_A
    assert abs(gaussian.std().item() - 1 / 4) < 0.01
    kaiming = MoSLoRALinear(nn.Linear(400, 8), MoSLoRAConfig(rank=4, a_init="kaiming")).lora_A
    assert kaiming.abs().max() <= 1 / math.sqrt(400)


def test_bf16_base_with_fp32_adapter_keeps_the_base_dtype():
    layer = _layer(dtype=torch.bfloat16)
    _perturb(layer)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() @ (layer.base_layer.weight.float() + layer.delta_weight()).T + layer.base_layer.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


def test_scale_multiplies_the_update():
    layer = _layer()
    _perturb(layer)
    x = torch.randn(2, 12)
    full = layer(x) - layer.base_layer(x)
    layer.scale = 0.5
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 0.5 * full, rtol=1e-5, atol=1e-6)
