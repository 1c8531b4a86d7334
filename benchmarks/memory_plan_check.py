"""The memory plan against a real GPU: the SDXL UNet (random weights from its config) trained for a few steps under
each preset, torch.cuda.max_memory_allocated against the plan's prediction.

    python benchmarks/memory_plan_check.py                       # 1024 px, rank 16, the plan's presets, 3 steps
    python benchmarks/memory_plan_check.py --resolution 512 --steps 2

The step is the trainer's: cached latents and prompt embeddings (so the text encoders and VAE are off the GPU, as
`train` leaves them), the adapted UNet under bf16 autocast with gradient checkpointing as the preset says, AdamW
(or bitsandbytes' 8-bit AdamW) on the adapter. Writes benchmarks/memory-plan-<gpu>-<resolution>px.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_moslora import MoSLoRAConfig, inject_moslora, moslora_parameters  # noqa: E402
from dreambooth_moslora.fp8 import store_frozen_weights_in_fp8  # noqa: E402
from dreambooth_moslora.memory_plan import GIB, PlanSettings, model_configs, plan_memory, presets  # noqa: E402
from dreambooth_moslora.sdxl import SDXL_TEXT_EMBED_DIM, SDXL_UNET_CONFIG  # noqa: E402


def optimizer_for(settings: PlanSettings, parameters):
    if settings.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=1e-4)
    return torch.optim.AdamW(parameters, lr=1e-4)


def measure(settings: PlanSettings, steps: int, device) -> dict:
    """Peak allocated bytes over `steps` training steps of the preset, from an empty allocator."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.bfloat16).requires_grad_(False)
    inject_moslora(unet, MoSLoRAConfig(rank=settings.rank, target_modules=settings.target_modules))
    if settings.base_weights_fp8:
        store_frozen_weights_in_fp8(unet)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = optimizer_for(settings, list(moslora_parameters(unet)))
    batch, side = settings.batch_size, settings.resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device)
    prompts = torch.randn(batch, 77, SDXL_UNET_CONFIG["cross_attention_dim"], device=device, dtype=torch.bfloat16)
    pooled = torch.randn(batch, SDXL_TEXT_EMBED_DIM, device=device, dtype=torch.bfloat16)
    time_ids = torch.tensor([[settings.resolution] * 2 + [0, 0] + [settings.resolution] * 2] * batch, device=device,
                            dtype=torch.bfloat16)
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            prediction = unet(latents.to(torch.bfloat16), torch.randint(0, 1000, (batch,), device=device), prompts,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.nn.functional.mse_loss(prediction.float(), torch.randn_like(latents)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device)
    del unet, optimizer, prediction
    return {"peak_bytes": peak, "step_s": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this check needs a CUDA GPU; on the CPU, tests/test_memory_plan.py checks the plan")
    device = torch.device("cuda")
    configs = model_configs("stabilityai/stable-diffusion-xl-base-1.0")
    base = PlanSettings(resolution=args.resolution, rank=args.rank, cached_images=0)
    rows = []
    for name, settings in presets(base).items():
        if settings.train_text_encoder:
            continue  # the check trains the UNet alone
        if settings.optimizer == "adamw8bit" and not _has_bitsandbytes():
            settings = replace(settings, optimizer="adamw")
            name += " (AdamW: no bitsandbytes)"
        predicted = plan_memory(configs, settings).total
        measured = measure(settings, args.steps, device)
        rows.append({"preset": name, "settings": asdict(settings), "predicted_bytes": predicted, **measured,
                     "error": predicted / measured["peak_bytes"] - 1})
        print(f"{name}: predicted {predicted / GIB:.2f} GiB, measured {measured['peak_bytes'] / GIB:.2f} GiB, "
              f"{rows[-1]['error']:+.1%}, {measured['step_s']:.2f} s/step", flush=True)
    gpu = torch.cuda.get_device_name(device)
    stem = ROOT / "benchmarks" / f"memory-plan-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}-{args.resolution}px"
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{gpu}, {result['date']}, torch {torch.__version__}: `{result['command']}`", "",
             "| preset | predicted | measured max_memory_allocated | error | step |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['preset']} | {r['predicted_bytes'] / GIB:.2f} GiB | {r['peak_bytes'] / GIB:.2f} GiB | "
              f"{r['error']:+.1%} | {r['step_s']:.2f} s |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


if __name__ == "__main__":
    main()
