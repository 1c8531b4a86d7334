"""Pretrain the mini SDXL and the world analyzer from a seed, then measure both.

    python benchmarks/pretrain_world.py                  # about 75 min on 2 CPU cores
    python benchmarks/pretrain_world.py --decoder_only   # only the decoder stage, on the model in --output_dir
    python benchmarks/pretrain_world.py --patterns_only  # only the pattern stage, on the model in --output_dir

Writes assets/mini-sdxl/ (a diffusers folder, fp16), assets/world-analyzer.safetensors and
assets/mini-sdxl-report.json (settings, timings, analyzer accuracy, held-out prompt accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import StableDiffusionXLPipeline  # noqa: E402

from dreambooth_moslora.adapter.files import write_text_atomically  # noqa: E402
from dreambooth_moslora.adapter.io import write_safetensors  # noqa: E402
from dreambooth_moslora.world.analyzer import accuracy, load_analyzer, save_analyzer, train_analyzer  # noqa: E402
from dreambooth_moslora.world.model import save_mini_sdxl_pipeline  # noqa: E402
from dreambooth_moslora.world.pretrain import (PretrainSettings, evaluate_world_model, finetune_decoder,  # noqa: E402
                                               learn_patterns, pretrain_world_model)
from dreambooth_moslora.world.render import render, sample_scene  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps, help="denoiser optimizer steps")
    parser.add_argument("--vae_steps", type=int, default=PretrainSettings.vae_steps)
    parser.add_argument("--analyzer_steps", type=int, default=1500)
    parser.add_argument("--output_dir", type=Path, default=ASSETS / "mini-sdxl")
    parser.add_argument("--analyzer_file", type=Path, default=ASSETS / "world-analyzer.safetensors")
    parser.add_argument("--report", type=Path, default=ASSETS / "mini-sdxl-report.json")
    late = parser.add_mutually_exclusive_group()
    late.add_argument("--decoder_only", dest="only", action="store_const", const="decoder_finetune",
                      help="fine-tune the decoder of the model already in --output_dir (a last stage), keep the rest")
    late.add_argument("--patterns_only", dest="only", action="store_const", const="patterns",
                      help="teach the model already in --output_dir patterned objects (a later stage), keep the VAE")
    args = parser.parse_args(argv)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    if args.only:
        return late_stage(args, log)
    timings, started = {}, time.perf_counter()

    analyzer = train_analyzer(steps=args.analyzer_steps, seed=args.seed, log=log)
    timings["analyzer_s"] = round(time.perf_counter() - started, 1)
    rng = np.random.default_rng(args.seed + 1000)
    fresh = [sample_scene(rng) for _ in range(2000)]
    analyzer_accuracy = accuracy(analyzer, [render(s) for s in fresh], fresh)
    log(f"analyzer accuracy on 2000 fresh renders: {analyzer_accuracy}")
    args.analyzer_file.parent.mkdir(parents=True, exist_ok=True)
    save_analyzer(analyzer, args.analyzer_file)

    settings = PretrainSettings(seed=args.seed, steps=args.steps, vae_steps=args.vae_steps)
    pipe = pretrain_world_model(settings, log)
    timings["pretraining_s"] = round(time.perf_counter() - started - timings["analyzer_s"], 1)
    save_mini_sdxl_pipeline(pipe, args.output_dir)
    reloaded = StableDiffusionXLPipeline.from_pretrained(args.output_dir)  # fp32: see save_mini_sdxl_pipeline
    quality = evaluate_world_model(reloaded, analyzer)
    log(f"held-out prompt accuracy: {quality}")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    report = {
        "seed": args.seed,
        "analyzer_steps": args.analyzer_steps,
        "settings": asdict(settings),
        "analyzer_accuracy_fresh_renders": analyzer_accuracy,
        "held_out_quality": quality,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    write_text_atomically(args.report, json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.output_dir}, {args.analyzer_file} and {args.report}")


LATE_STAGES = {
    "decoder_finetune": (lambda pipe, settings, log: finetune_decoder(pipe.vae, settings, log), ("vae",), "decoder_"),
    "patterns": (learn_patterns, ("unet", "text_encoder", "text_encoder_2"), "pattern_"),
}
"""Stage: how it trains the pipeline, the components it changes, its settings' prefix."""


def late_stage(args, log):
    """A stage after the first ones, on a model pretrained without it: only the weight files of the components
    it trains are rewritten (saving the whole pipeline would also rewrite its configs with loader noise), and the
    report keeps its earlier measures."""
    started = time.perf_counter()
    settings = PretrainSettings(seed=args.seed)
    train, components, prefix = LATE_STAGES[args.only]
    pipe = StableDiffusionXLPipeline.from_pretrained(args.output_dir)
    train(pipe, settings, log)
    for name in components:
        weights = {key: tensor.to(torch.float16) for key, tensor in getattr(pipe, name).state_dict().items()}
        file = "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        write_safetensors(weights, args.output_dir / name / file, {"format": "pt"})
    quality = evaluate_world_model(StableDiffusionXLPipeline.from_pretrained(args.output_dir), load_analyzer(args.analyzer_file))
    log(f"held-out prompt accuracy: {quality}")
    report = json.loads(args.report.read_text())
    report["settings"] = report["settings"] | {k: v for k, v in asdict(settings).items() if k.startswith(prefix)}
    report.setdefault(f"held_out_quality_before_{args.only}", report["held_out_quality"])
    report["held_out_quality"] = quality
    report["timings"][f"{args.only}_s"] = round(time.perf_counter() - started, 1)
    write_text_atomically(args.report, json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.output_dir} and {args.report}")


if __name__ == "__main__":
    main()
