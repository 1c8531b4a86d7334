"""Which order computes s·B·M·A·x faster: x·(s·M·A)ᵀ·Bᵀ (ours) or ((x·Aᵀ)·Mᵀ)·Bᵀ?

Times forward+backward of both orders at SDXL attention shapes and prints the ratio per shape.
Run: python benchmarks/forward_order.py [--device cuda] [--dtype bf16]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dreambooth_moslora.functional import low_rank_forward


def mix_after_down(x, lora_A, lora_mixer, lora_B, scaling):
    return F.linear(F.linear(F.linear(x, lora_A), scaling * lora_mixer), lora_B)


def time_fn(fn, args, repeats, device):
    def step():
        fn(*args).sum().backward()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for features in (640, 1280, 2048):
        for tokens in (1024, 4096):
            for rank in (4, 16, 64):
                x = torch.randn(2, tokens, features, device=args.device, dtype=dtype)
                weights = [
                    torch.randn(*shape, device=args.device, dtype=dtype, requires_grad=True)
                    for shape in ((rank, features), (rank, rank), (features, rank))
                ]
                ours = time_fn(low_rank_forward, (x, *weights, 0.5), args.repeats, args.device)
                other = time_fn(mix_after_down, (x, *weights, 0.5), args.repeats, args.device)
                rows.append({"features": features, "tokens": tokens, "rank": rank,
                             "mix_first_s": ours, "mix_after_down_s": other, "ratio": ours / other})
                print(json.dumps(rows[-1]), flush=True)
    print(f"median ratio mix-first / mix-after-down: {statistics.median(r['ratio'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
