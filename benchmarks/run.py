"""Speed and memory of MoSLoRA, side by side with PEFT LoRA and with the uncached training flow, in one process.

1. adapter overhead: a UNet training step (forward, backward, AdamW) with MoSLoRA, MoSLoRA without mixer and
   PEFT LoRA on the same UNet weights, same rank, targets, inputs and precision; runs alternate, medians compared.
2. one adapted linear layer at SDXL shapes: forward+backward of both MoSLoRA orders and PEFT's LoRA layer.
3. end to end: our trainer with latent and prompt caching against the same trainer with both off.
4. sampling: UNet denoising step with the adapter fused, unfused, and the base model.
5. fp8 base weights: the MoSLoRA training step with the frozen weights stored in fp8 against the base's dtype.

Memory: bytes saved for backward (unique storages other than parameters, any device) and, on CUDA, peak
allocated memory.
On a GPU also model FLOPs utilisation: UNet forward+backward FLOPs (torch's FLOP counter) / step time / the
measured bf16 matmul rate.

Run: python benchmarks/run.py --preset tiny            (CPU, a few minutes)
     python benchmarks/run.py --preset sdxl --device cuda   (real SDXL UNet, random weights, 1024 px, bf16)
Writes benchmarks/results-<preset>-<device>-<resolution>px.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from dreambooth_moslora import MoSLoRAConfig, MoSLoRALinear, fuse_moslora, inject_moslora
from dreambooth_moslora.adapter.config import UNET_TARGETS
from dreambooth_moslora.pipeline.sdxl import SDXL_TEXT_EMBED_DIM, SDXL_UNET_CONFIG
from dreambooth_moslora.pipeline.tiny import save_tiny_sdxl_pipeline
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.fp8 import store_frozen_weights_in_fp8
from dreambooth_moslora.trainer.train import train

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("overhead", "sampling", "layer", "end_to_end", "fp8")  # the adapter overhead always runs: the others use it
PRESETS = {
    "tiny": dict(unet=None, resolution=128, batch=2, rank=4, steps=3, rounds=25,
                 layer_features=(640, 1280), layer_tokens=(1024,), layer_ranks=(4, 16), e2e_steps=100),
    "sdxl": dict(unet=SDXL_UNET_CONFIG, resolution=1024, batch=1, rank=16, steps=3, rounds=7,
                 layer_features=(640, 1280, 2048), layer_tokens=(1024, 4096), layer_ranks=(4, 16, 64), e2e_steps=100),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_activation_bytes(fn, module: nn.Module) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while fn() runs its forward, leaving out the
    module's own parameters (they are in memory anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def peak_memory(fn, device) -> int | None:
    """What fn adds at its peak to what was allocated before it: the variants live side by side in one process, so
    the allocator's absolute peak would count the others' weights and gradients too (the first GPU run did)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def unet_inputs(config, resolution, batch, device, dtype):
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    text_dim = SDXL_TEXT_EMBED_DIM if config["cross_attention_dim"] == 2048 else config[
        "projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    tensors = dict(
        sample=torch.randn(batch, 4, side, side, generator=generator),
        encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=generator),
        text_embeds=torch.randn(batch, text_dim, generator=generator),
    )
    tensors = {k: v.to(device, dtype) for k, v in tensors.items()}
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device, dtype=dtype)
    return dict(sample=tensors["sample"], timestep=torch.tensor([500] * batch, device=device),
                encoder_hidden_states=tensors["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": tensors["text_embeds"], "time_ids": time_ids})


def variant_unets(base: UNet2DConditionModel, rank: int) -> dict[str, UNet2DConditionModel]:
    """Three adapted UNets sharing the base's frozen weights (no copies): ours, ours without mixer, PEFT's."""
    variants = {}
    for name in ("moslora", "moslora_none", "peft_lora"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**base.config)
        unet.load_state_dict(base.state_dict(), assign=True)
        unet.requires_grad_(False)
        if name == "peft_lora":
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS),
                                               init_lora_weights="gaussian"), unet)
            for module_name, param in unet.named_parameters():
                if "lora_" in module_name:
                    param.data = param.data.float()
                    param.requires_grad_(True)
        else:
            inject_moslora(unet, MoSLoRAConfig(rank=rank, mixer_init="none" if name == "moslora_none" else "orthogonal"))
        variants[name] = unet
    return variants


def training_step(unet, inputs, optimizer, autocast_dtype, device):
    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = unet(**inputs).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def adapter_overhead(base, inputs, preset, device, autocast_dtype):
    variants = variant_unets(base, preset["rank"])
    steps = {}
    for name, unet in variants.items():
        params = [p for p in unet.parameters() if p.requires_grad]
        steps[name] = training_step(unet, inputs, torch.optim.AdamW(params, lr=1e-4), autocast_dtype, device)
    times = {name: [] for name in variants}
    for _ in range(preset["rounds"]):  # alternate, so drift hits every variant alike
        for name, step in steps.items():
            times[name].append(timed(step, device, preset["steps"]))
    results = {}
    for name, unet in variants.items():
        def forward(unet=unet):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                unet(**inputs).sample.float().pow(2).mean()

        results[name] = {
            "step_s": statistics.median(times[name]),
            "saved_activation_bytes": saved_activation_bytes(forward, unet),
            "peak_bytes": peak_memory(steps[name], device),
            "trainable_parameters": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        }
    peft = results["peft_lora"]
    for name in ("moslora", "moslora_none"):  # the median of per-round ratios: drift between rounds cancels
        results[name]["step_time_ratio_vs_peft"] = statistics.median(
            mine / theirs for mine, theirs in zip(times[name], times["peft_lora"]))
        results[name]["activation_ratio_vs_peft"] = results[name]["saved_activation_bytes"] / peft["saved_activation_bytes"]
        if peft["peak_bytes"]:
            results[name]["peak_memory_ratio_vs_peft"] = results[name]["peak_bytes"] / peft["peak_bytes"]
    return results, variants


def fp8_base_weights(base, inputs, preset, device, autocast_dtype):
    """The MoSLoRA training step with frozen weights stored in fp8 (upcast per layer) against the same step with
    them in the base's dtype; runs alternate, the ratio is the median of per-round ratios."""
    steps, peaks, times = {}, {}, {"base_dtype": [], "fp8": []}
    for name in times:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**base.config)
        unet.load_state_dict(base.state_dict(), assign=True)
        unet.requires_grad_(False)
        inject_moslora(unet, MoSLoRAConfig(rank=preset["rank"]))
        if name == "fp8":
            store_frozen_weights_in_fp8(unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        steps[name] = training_step(unet, inputs, torch.optim.AdamW(params, lr=1e-4), autocast_dtype, device)
    for _ in range(preset["rounds"]):
        for name, step in steps.items():
            times[name].append(timed(step, device, preset["steps"]))
    for name, step in steps.items():
        peaks[name] = peak_memory(step, device)
    return {"step_s": {n: statistics.median(t) for n, t in times.items()},
            "fp8_step_time_ratio": statistics.median(f / b for f, b in zip(times["fp8"], times["base_dtype"])),
            "peak_bytes": peaks}


def mix_after_down(x, lora_A, lora_mixer, lora_B, scaling):
    return F.linear(F.linear(F.linear(x, lora_A), scaling * lora_mixer), lora_B)


def layer_benchmark(preset, device, dtype):
    rows = []
    for features in preset["layer_features"]:
        for tokens in preset["layer_tokens"]:
            for rank in preset["layer_ranks"]:
                x = torch.randn(2, tokens, features, device=device, dtype=dtype)
                base = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
                ours = MoSLoRALinear(base, MoSLoRAConfig(rank=rank))
                with torch.no_grad():
                    ours.lora_B.normal_()
                holder = nn.Module()
                holder.proj = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
                inject_adapter_in_model(LoraConfig(r=rank, target_modules=["proj"]), holder)
                weights = [ours.lora_A, ours.lora_mixer, ours.lora_B]
                variants = {
                    "moslora": lambda: ours(x),
                    "moslora_mix_after_down": lambda: base(x) + mix_after_down(x.float(), *weights, 1.0).to(dtype),
                    "peft_lora": lambda: holder.proj(x),
                }
                row = {"features": features, "tokens": tokens, "rank": rank}
                for name, forward in variants.items():
                    def step(forward=forward):  # under autocast on a GPU, as in training
                        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                            return forward()

                    row[f"{name}_s"] = timed(lambda f=step: f().float().sum().backward(), device, 5)
                    row[f"{name}_saved_bytes"] = saved_activation_bytes(step, holder if name == "peft_lora" else ours)
                row["moslora_vs_peft"] = row["moslora_s"] / row["peft_lora_s"]
                row["mix_first_vs_mix_after_down"] = row["moslora_s"] / row["moslora_mix_after_down_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def sampling_benchmark(base, variants, inputs, preset, device, autocast_dtype):
    """One classifier-free-guidance UNet call (batch 2): what a sampling step costs."""
    ours = variants["moslora"]
    for layer in ours.modules():
        if isinstance(layer, MoSLoRALinear):
            with torch.no_grad():
                layer.lora_B.normal_(std=0.01)
    doubled = {k: (torch.cat([v, v]) if torch.is_tensor(v) else {a: torch.cat([b, b]) for a, b in v.items()})
               for k, v in inputs.items()}

    def call(unet):
        @torch.no_grad()
        def run():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                unet(**doubled)
        return run

    # each adapted state is compared with the base timed alternately beside it, so drift cancels
    before, unfused_times, after, fused_times = [], [], [], []
    for _ in range(preset["rounds"]):
        before.append(timed(call(base), device, preset["steps"]))
        unfused_times.append(timed(call(ours), device, preset["steps"]))
    fuse_moslora(ours)  # merges into the weights it shares with `base`: the values change, not the cost
    for _ in range(preset["rounds"]):
        after.append(timed(call(base), device, preset["steps"]))
        fused_times.append(timed(call(ours), device, preset["steps"]))
    unfused_vs_base = statistics.median(u / b for u, b in zip(unfused_times, before))
    fused_vs_base = statistics.median(f / b for f, b in zip(fused_times, after))
    return {"base_s": statistics.median(before + after), "unfused_s": statistics.median(unfused_times),
            "fused_s": statistics.median(fused_times), "fused_vs_base": fused_vs_base,
            "unfused_vs_base": unfused_vs_base, "unfused_vs_fused": unfused_vs_base / fused_vs_base}


def end_to_end(preset, device):
    """Our trainer on the tiny pipeline and the bundled subject, caching on and off, alternating twice."""
    from accelerate.state import AcceleratorState

    folder = Path(tempfile.mkdtemp())
    base = save_tiny_sdxl_pipeline(folder / "tiny")
    times = {"cached": [], "uncached": []}
    for round_index in range(2):
        for name, extra in (("cached", []), ("uncached", ["--no_cache_latents", "--no_cache_prompts"])):
            args = parse_args([
                "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(ROOT / "assets" / "subject"),
                "--instance_prompt", "a photo of sks mug", "--resolution", "128", "--center_crop", "--random_flip",
                "--max_train_steps", str(preset["e2e_steps"]), "--checkpointing_steps", "100000",
                "--report_to", "none", "--output_dir", str(folder / f"{name}-{round_index}"), *extra])
            start = time.perf_counter()
            train(args)
            times[name].append(time.perf_counter() - start)
            AcceleratorState._reset_state(reset_partial_state=True)
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    return {"steps": preset["e2e_steps"], "cached_s": cached, "uncached_s": uncached, "speedup": uncached / cached,
            "uncached_work_per_sample_s": encoding_profile(base, device)}


def encoding_profile(base, device):
    """What caching removes from each uncached step: reading an image, the VAE, the two text encoders."""
    from diffusers import StableDiffusionXLPipeline

    from dreambooth_moslora.trainer.conditioning import encode_latent_distribution, encode_prompts
    from dreambooth_moslora.trainer.data import center_sample, read_examples, render

    pipe = StableDiffusionXLPipeline.from_pretrained(base).to(device)
    example = read_examples(ROOT / "assets" / "subject", "a photo of sks mug", 128, True)[0]
    pixels = render(example, center_sample(example, False))[None]
    encoders, tokenizers = (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)
    with torch.no_grad():
        return {
            "read_and_crop_image": timed(lambda: render(example, center_sample(example, False)), device, 10),
            "vae_encode": timed(lambda: encode_latent_distribution(pipe.vae, pixels), device, 10),
            "text_encoders": timed(lambda: encode_prompts(encoders, tokenizers, ["a photo of sks mug"], device), device, 10),
        }


def model_flops_utilisation(unet, inputs, step_s, device, autocast_dtype):
    """UNet forward+backward FLOPs per step / step time / measured bf16 matmul rate of this GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=autocast_dtype):
            unet(**inputs).sample.float().pow(2).mean().backward()
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_s = timed(lambda: a @ a, device, 20)
    peak_rate = 2 * 8192**3 / matmul_s
    flops = counter.get_total_flops()
    return {"flops_per_step": flops, "measured_bf16_matmul_tflops": peak_rate / 1e12,
            "achieved_tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak_rate}


def markdown(results) -> str:
    overhead = results["adapter_overhead"]
    lines = [f"Device: {results['device_name']}; preset {results['preset']}; {results['command']}", "",
             "| measurement | MoSLoRA | MoSLoRA, no mixer | PEFT LoRA |", "| --- | --- | --- | --- |"]
    lines.append("| training step (s) | " + " | ".join(f"{overhead[n]['step_s']:.4f}" for n in
                                                      ("moslora", "moslora_none", "peft_lora")) + " |")
    lines.append("| step time vs PEFT | " + " | ".join(f"{overhead[n]['step_time_ratio_vs_peft']:.3f}" for n in
                                                       ("moslora", "moslora_none")) + " | 1 |")
    lines.append("| saved activations (MiB) | " + " | ".join(
        f"{overhead[n]['saved_activation_bytes'] / 2**20:.1f}" for n in ("moslora", "moslora_none", "peft_lora")) + " |")
    if overhead["peft_lora"]["peak_bytes"]:
        lines.append("| peak memory the step adds (GiB) | " + " | ".join(
            f"{overhead[n]['peak_bytes'] / 2**30:.2f}" for n in ("moslora", "moslora_none", "peft_lora")) + " |")
    lines.append("")
    if "sampling" in results:
        sampling = results["sampling"]
        lines.append(f"Sampling step: fused/base {sampling['fused_vs_base']:.3f}, unfused/fused "
                     f"{sampling['unfused_vs_fused']:.3f}.")
    if "end_to_end" in results:
        e2e = results["end_to_end"]
        work = e2e["uncached_work_per_sample_s"]
        lines.append(f"End to end ({e2e['steps']} steps, tiny pipeline): cached {e2e['cached_s']:.1f} s, uncached "
                     f"{e2e['uncached_s']:.1f} s, {e2e['speedup']:.2f}x. Uncached work per sample: image "
                     f"{work['read_and_crop_image'] * 1e3:.1f} ms, VAE {work['vae_encode'] * 1e3:.1f} ms, "
                     f"text encoders {work['text_encoders'] * 1e3:.1f} ms.")
    if "layer" in results:
        layer = results["layer"]
        lines.append(f"One layer ({len(layer)} SDXL shapes): MoSLoRA/PEFT time median "
                     f"{statistics.median(r['moslora_vs_peft'] for r in layer):.3f}; mix-first/mix-after-down median "
                     f"{statistics.median(r['mix_first_vs_mix_after_down'] for r in layer):.3f}.")
    if "fp8" in results:
        fp8 = results["fp8"]
        lines.append(f"fp8 base weights: training step {fp8['step_s']['fp8']:.4f} s against "
                     f"{fp8['step_s']['base_dtype']:.4f} s, {fp8['fp8_step_time_ratio']:.3f}x"
                     + (f"; peak {fp8['peak_bytes']['fp8'] / 2**30:.2f} GiB against "
                        f"{fp8['peak_bytes']['base_dtype'] / 2**30:.2f} GiB" if fp8["peak_bytes"]["fp8"] else "") + ".")
    if "mfu" in results:
        mfu = results["mfu"]
        lines.append(f"MFU: {mfu['mfu']:.1%} ({mfu['achieved_tflops']:.0f} of a measured "
                     f"{mfu['measured_bf16_matmul_tflops']:.0f} bf16 TFLOP/s).")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="override the preset's (e.g. 256 for sdxl on CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="override the preset's alternating rounds")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's timed steps per round")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    for name in ("resolution", "rounds", "steps"):
        if getattr(args, name):
            preset[name] = getattr(args, name)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts takes {','.join(PARTS)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype, autocast_dtype = (torch.bfloat16, torch.bfloat16) if cuda or args.preset == "sdxl" else (torch.float32, None)
    torch.manual_seed(0)
    if preset["unet"] is None:
        with tempfile.TemporaryDirectory() as folder:
            base = UNet2DConditionModel.from_pretrained(save_tiny_sdxl_pipeline(folder), subfolder="unet")
    else:
        with torch.device(device):
            base = UNet2DConditionModel(**preset["unet"])
    base = base.to(device, dtype).requires_grad_(False)
    inputs = unet_inputs(base.config, preset["resolution"], preset["batch"], device, dtype)

    results = {"preset": args.preset, "device": str(device), "resolution": preset["resolution"],
               "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU",
               "command": "python " + " ".join(sys.argv), "torch": torch.__version__}
    results["adapter_overhead"], variants = adapter_overhead(base, inputs, preset, device, autocast_dtype)
    print(json.dumps(results["adapter_overhead"], indent=2), flush=True)
    if cuda:
        results["mfu"] = model_flops_utilisation(variants["moslora"], inputs,
                                                 results["adapter_overhead"]["moslora"]["step_s"], device, autocast_dtype)
    if "sampling" in parts:
        results["sampling"] = sampling_benchmark(base, variants, inputs, preset, device, autocast_dtype)
        print(json.dumps(results["sampling"]), flush=True)
    if "layer" in parts:
        results["layer"] = layer_benchmark(preset, device, dtype)
    if "fp8" in parts:
        results["fp8"] = fp8_base_weights(base, inputs, preset, device, autocast_dtype)
        print(json.dumps(results["fp8"]), flush=True)
    if "end_to_end" in parts:
        results["end_to_end"] = end_to_end(preset, device)
        print(json.dumps(results["end_to_end"]), flush=True)
    stem = ROOT / "benchmarks" / f"results-{args.preset}-{device.type}-{preset['resolution']}px"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
