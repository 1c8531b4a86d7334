"""The personalization benchmark on the mini world: DreamBooth with MoSLoRA, LoRA and fixed-mixer controls.

    python benchmarks/personalization.py   # 3 subjects x 3 seeds x (5 methods, and 2 of them with prior preservation)

Writes results.json, results.md (mean ± std over subjects and seeds, paired tests against LoRA) and
samples.png to --output_dir (default benchmarks/personalization/), plus every run's adapter under runs/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_moslora.world.personalization import METHODS, BenchmarkSettings, run_benchmark  # noqa: E402
from dreambooth_moslora.world.subjects import SUBJECTS  # noqa: E402


def main(argv=None):
    defaults = BenchmarkSettings(base_model="", analyzer_file="", output_dir="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=str(ROOT / "assets" / "mini-sdxl"))
    parser.add_argument("--analyzer_file", default=str(ROOT / "assets" / "world-analyzer.safetensors"))
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "personalization"))
    parser.add_argument("--subjects", nargs="+", default=list(defaults.subjects), choices=[s.name for s in SUBJECTS])
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    parser.add_argument("--prior", choices=("off", "on", "both"), default="both", help="prior preservation runs")
    parser.add_argument("--prior_methods", nargs="+", default=list(defaults.prior_methods), choices=list(METHODS),
                        help="the methods also run with prior preservation")
    for name in ("rank", "steps", "train_batch_size", "images_per_prompt", "inference_steps", "num_class_images"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale)
    args = parser.parse_args(argv)
    prior = {"off": (False,), "on": (True,), "both": (False, True)}[args.prior]
    settings = BenchmarkSettings(
        base_model=args.base_model, analyzer_file=args.analyzer_file, output_dir=args.output_dir,
        subjects=tuple(args.subjects), methods=tuple(args.methods), seeds=tuple(args.seeds), prior_preservation=prior,
        prior_methods=tuple(args.prior_methods),
        rank=args.rank, steps=args.steps, learning_rate=args.learning_rate, train_batch_size=args.train_batch_size,
        images_per_prompt=args.images_per_prompt, inference_steps=args.inference_steps,
        num_class_images=args.num_class_images, guidance_scale=args.guidance_scale,
    )
    started = time.perf_counter()
    run_benchmark(settings, log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True))
    print(f"done in {time.perf_counter() - started:.0f} s; see {args.output_dir}/results.md and samples.png")


if __name__ == "__main__":
    main()
