"""The meta-device counting the memory plan stands on: live tensors, the fused attention's kept outputs, CUDA
autocast's casts."""

import torch
import torch.nn.functional as F

from dreambooth_moslora.trainer.meta_memory import LiveTensorBytes, emulated_autocast, fused_attention


def test_live_tensor_bytes_counts_what_lives_at_once_and_no_views():
    counter = LiveTensorBytes()
    with counter:
        a = torch.empty(256, dtype=torch.float32)  # 1 KiB
        b = torch.empty(512, dtype=torch.float32)  # 2 KiB
        view = b[:10]
        del a
        c = torch.empty(128, dtype=torch.float32)  # 0.5 KiB, after a's 1 KiB went
    assert counter.peak == 3 * 1024 and counter.live == 2.5 * 1024
    assert view.shape == (10,) and c.numel() == 128


def test_fused_attention_keeps_no_attention_matrix_on_the_meta_device():
    q = k = v = torch.empty(1, 1, 4096, 64, device="meta")
    plain, fused = LiveTensorBytes(), LiveTensorBytes()
    with plain:
        F.scaled_dot_product_attention(q, k, v)
    with fused_attention(), fused:
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape
    assert plain.peak >= 4096 * 4096 * 4 > 10 * fused.peak  # the L×L matrix, against the output and log-sum-exp


def test_the_emulated_autocast_casts_as_cuda_autocast_does():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(2, 8)
    with emulated_autocast(torch.bfloat16):
        product = F.linear(x, weight)
        normed = F.layer_norm(product, (8,))
        grouped = F.group_norm(product.view(2, 8, 1, 1), 2)
    assert product.dtype == torch.bfloat16  # as CUDA's (and the CPU's) autocast
    assert normed.dtype == grouped.dtype == torch.float32  # CUDA's fp32 list; the CPU's autocast keeps bf16 here
    (normed.sum() + grouped.sum()).backward()
    assert weight.grad.dtype == torch.float32
