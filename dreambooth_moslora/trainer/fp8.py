"""Frozen base weights stored in fp8 (float8_e4m3fn) and computed in the training dtype: half of SDXL's UNet.

diffusers' `enable_layerwise_casting` stores weights in fp8 between calls, but autograd keeps the module's own
weight for the backward pass, which is fp8 again by then, so it cannot train. Here the linear and convolution
layers keep their weight in fp8 and upcast it inside their own autograd function, once in forward and once in
backward (the frozen weight needs no gradient, so the input is not kept for one). The cast is direct, as
kohya's `--fp8_base` and ComfyUI's fp8 checkpoints do: e4m3 keeps 3 mantissa bits, about 6% relative error per
weight, no scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.to(grad_output.dtype), None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, options):
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.options = x.shape, options
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), *options)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(grad_output.dtype), grad_output,
                                                *ctx.options)
        return grad_input, None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight lives in fp8; same state-dict names, so nothing else notices."""

    def forward(self, x):
        return _Fp8Linear.apply(x, self.weight, self.bias)


class Fp8Conv2d(nn.Conv2d):
    def forward(self, x):
        return _Fp8Conv2d.apply(x, self.weight, self.bias, (self.stride, self.padding, self.dilation, self.groups))


def store_frozen_weights_in_fp8(model: nn.Module) -> int:
    """Every frozen nn.Linear and nn.Conv2d weight of the model in fp8 (biases and norms keep their dtype).
    Call after the adapter is injected: its own layers are left alone, as are convolutions padded otherwise than
    with zeros (SDXL has none). Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        swapped = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}.get(type(module))
        if swapped is None or module.weight.requires_grad or getattr(module, "padding_mode", "zeros") != "zeros":
            continue
        module.__class__ = swapped
        module.weight.data = module.weight.data.to(FP8)
        changed += 1
    return changed
