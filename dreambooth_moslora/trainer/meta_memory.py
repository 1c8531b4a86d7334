"""Counting a GPU's memory on the meta device, where tensors have shapes and dtypes but no storage.

`LiveTensorBytes` counts every tensor an op creates while it lives. On the meta device attention would take the
math path and keep the L×L attention matrix, which the fused kernels a GPU runs (flash, memory-efficient,
xformers) never keep: `fused_attention` runs the memory-efficient kernel's own meta form instead. The meta device
has no autocast: `emulated_autocast` applies CUDA autocast's casts there, so fp32 norms and the low-precision copies
that autograd keeps are counted as a GPU keeps them.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops create (on `device` only, when given), counted while they live; `peak` is
    the most alive at once."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:  # not a view
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata
        if key in self._sizes or (self.device is not None and storage.device != self.device):
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key):
        self.live -= self._sizes.pop(key)


@contextlib.contextmanager
def fused_attention():
    """scaled_dot_product_attention on meta tensors as the fused GPU kernels run it: the output and a log-sum-exp
    are kept for backward, never the attention matrix."""
    original = F.scaled_dot_product_attention

    def memory_efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = memory_efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


_LOW_PRECISION_OPS = frozenset((F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
                                torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm))
_FP32_OPS = frozenset((F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss))


class emulated_autocast(TorchFunctionMode):
    """CUDA autocast's casts on any device: matrix products and convolutions in the low-precision dtype, norms,
    softmax and the loss in fp32 (the main entries of PyTorch's CUDA autocast op reference). The casts happen
    above autograd, as the real ones do, so the copies autograd keeps for the backward are counted."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wanted = self.dtype if func in _LOW_PRECISION_OPS else torch.float32 if func in _FP32_OPS else None
        if wanted is not None:
            args, kwargs = tree_map(lambda t: _cast(t, wanted), (args, kwargs))
        return func(*args, **kwargs)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value
