import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import perturb_adapters, training_argv
from dreambooth_moslora import MoSLoRAConfig, inject_moslora, moslora_parameters
from dreambooth_moslora.adapter.io import NATIVE_FILE, read_moslora
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.fp8 import FP8, Fp8Conv2d, Fp8Linear, store_frozen_weights_in_fp8
from dreambooth_moslora.trainer.memory_plan import PlanSettings, model_configs, plan_memory
from dreambooth_moslora.trainer.train import train
from helpers import record_training_dtypes, write_images

# float8_e4m3fn keeps 3 mantissa bits: a normal weight rounds to within 2^-4 of itself (relative), and below the
# smallest normal (2^-6) the spacing is 2^-9, so within 2^-10
RELATIVE, ABSOLUTE = 2.0**-4, 2.0**-10


def _rounding_bound(weight):
    """The most |fp8(w) - w| can be for each weight."""
    return RELATIVE * weight.abs() + ABSOLUTE


def _linear_or_conv(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 7), torch.randn(2, 12)
    return nn.Conv2d(3, 5, 3, padding=1, stride=2), torch.randn(2, 3, 9, 9)


def _apply(layer, x, weight, bias=None):
    """The layer's operation on x with the given weight and bias, in plain PyTorch."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_fp8_layer_stores_one_byte_a_weight_and_computes_within_the_rounding_error(kind):
    layer, x = _linear_or_conv(kind)
    layer.requires_grad_(False)
    original = copy.deepcopy(layer)
    assert store_frozen_weights_in_fp8(layer) == 1
    assert isinstance(layer, (Fp8Linear, Fp8Conv2d)) and layer.weight.dtype == FP8
    # one byte a weight: a quarter of fp32's storage, half of bf16's; the bias keeps its dtype
    assert layer.weight.untyped_storage().nbytes() == layer.weight.numel()
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, original.bias)
    stored = layer.weight.to(torch.float32)
    error = (stored - original.weight).abs()
    assert (error <= _rounding_bound(original.weight)).all() and error.max() > 0  # rounded, by no more than e4m3 does

    out = layer(x)
    exact = original(x)
    # each output is a sum of input x weight: its error is at most the sum of |input| x the weight's bound
    bound = _apply(layer, x.abs(), _rounding_bound(original.weight))
    assert ((out - exact).abs() <= bound + 1e-6).all() and (out - exact).abs().max() > 0
    torch.testing.assert_close(out, _apply(layer, x, stored, layer.bias), rtol=0, atol=1e-6)  # computed with the stored weight


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_fp8_layer_computes_in_its_inputs_dtype_and_gives_the_input_its_gradient(kind):
    layer, x = _linear_or_conv(kind)
    layer.requires_grad_(False)
    store_frozen_weights_in_fp8(layer)
    stored = layer.weight.to(torch.float32)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ours, theirs = x.to(dtype).clone().requires_grad_(), x.clone().requires_grad_()
        out = layer(ours)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        _apply(layer, theirs, stored, layer.bias).square().sum().backward()
        assert ours.grad.dtype == dtype
        torch.testing.assert_close(ours.grad.float(), theirs.grad, rtol=tolerance, atol=tolerance)
    assert layer.weight.grad is None and layer.weight.dtype == FP8


def _unet_inputs(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return dict(sample=torch.randn(2, config.in_channels, 8, 8, generator=generator), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 7, config.cross_attention_dim, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(2, text_dim, generator=generator),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


def _relative_error(output, reference):
    return ((output - reference).norm() / reference.norm()).item()


def test_only_frozen_weights_go_to_fp8_and_gradients_reach_only_the_adapter(tiny_pipe):
    unet = tiny_pipe.unet
    inject_moslora(unet, MoSLoRAConfig(rank=4))
    perturb_adapters(unet, std=0.1)
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        exact = unet(**inputs).sample
        stored_in_bf16 = copy.deepcopy(unet)
        for module in stored_in_bf16.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(torch.bfloat16).to(torch.float32)
        bf16_error = _relative_error(stored_in_bf16(**inputs).sample, exact)
    others = {name: p.clone() for name, p in unet.named_parameters() if p.dtype == torch.float32 and p.ndim < 2}

    changed = store_frozen_weights_in_fp8(unet)
    frozen = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.requires_grad]
    assert changed == len(frozen) > 0 and all(isinstance(m, (Fp8Linear, Fp8Conv2d)) for m in frozen)
    assert all(m.weight.dtype == FP8 and m.weight.untyped_storage().nbytes() == m.weight.numel() for m in frozen)
    adapter = moslora_parameters(unet)
    assert {p.dtype for p in adapter} == {torch.float32} and all(p.requires_grad for p in adapter)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in adapter}
    for name, param in unet.named_parameters():  # biases and norms keep their dtype and values
        if name in others:
            assert torch.equal(param, others[name]), name

    # the fp8 rounding shows in the output, more than bf16's would, and the output stays close
    output = unet(**inputs).sample
    fp8_error = _relative_error(output.detach(), exact)
    assert 2 * bf16_error < fp8_error < 0.25, (bf16_error, fp8_error)

    stored = [m.weight.detach().view(torch.uint8).clone() for m in frozen]
    output.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    torch.optim.AdamW(adapter, lr=1e-2).step()
    assert all(torch.equal(m.weight.view(torch.uint8), s) for m, s in zip(frozen, stored))

    reflected = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    assert store_frozen_weights_in_fp8(reflected) == 0 and reflected.weight.dtype == torch.float32
    trainable = nn.Linear(3, 3)
    assert store_frozen_weights_in_fp8(trainable) == 0 and trainable.weight.dtype == torch.float32


def test_training_on_fp8_base_weights_learns_and_the_plan_halves_the_unet(tiny_sdxl_dir, tmp_path, fresh_accelerate,
                                                                         monkeypatch):
    write_images(tmp_path / "instance")
    seen = record_training_dtypes(monkeypatch)
    argv = training_argv(tiny_sdxl_dir, tmp_path / "instance", tmp_path / "out", "--base_weights_dtype", "fp8",
                         "--mixed_precision", "bf16", "--validation_prompt", "a photo of sks dog",
                         "--num_validation_images", "1", "--num_inference_steps", "2", steps=3)
    result = train(parse_args(argv))
    # during the steps: every frozen UNet weight one byte in fp8, the adapter fp32, computing in bf16
    assert seen["frozen"] == {FP8} and seen["frozen_bytes"] == seen["frozen_numel"]
    assert seen["adapter"] == {torch.float32} and seen["layer_output"] == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(result.losses)))
    adapter = read_moslora(tmp_path / "out" / NATIVE_FILE)
    assert any(m.lora_B.abs().sum() > 0 for m in adapter.modules["unet"].values())
    configs = model_configs(str(tiny_sdxl_dir))
    plain = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="bf16"))
    fp8 = plan_memory(configs, PlanSettings(resolution=64, mixed_precision="bf16", base_weights_fp8=True))
    assert fp8.weights["UNet"] < 0.55 * plain.weights["UNet"]
