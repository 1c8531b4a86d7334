"""Two subjects in one adapter against each alone, on the mini world (dreambooth_moslora/world/multi_concept.py).

    python benchmarks/multi_concept.py            # striped-hexagram and dotted-egg, 3 seeds, 400 steps per subject
    python benchmarks/multi_concept.py --quick    # one seed, 100 steps: a CI-sized check

The recipe is the quick start's (MoSLoRA, captions, text-encoder adapters, base-model prior on 20 class prompts,
learning rate 1e-3). Adapters already trained are measured, not trained again, so an interrupted run resumes.
Writes results.json and results.md (mean ± std over seeds per adapter and subject: fidelity, leakage, prompt
fidelity, class shape accuracy) and every run's adapter and dataset file under runs/, to --output_dir (default
benchmarks/multi-concept/).
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

from dreambooth_moslora.trainer.arguments import PRIOR_MODES  # noqa: E402
from dreambooth_moslora.world.multi_concept import run_multi_concept  # noqa: E402
from dreambooth_moslora.world.personalization import METHODS, BenchmarkSettings  # noqa: E402
from dreambooth_moslora.world.subjects import SUBJECTS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=str(ROOT / "assets" / "mini-sdxl"))
    parser.add_argument("--analyzer_file", default=str(ROOT / "assets" / "world-analyzer.safetensors"))
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "multi-concept"))
    parser.add_argument("--pair", nargs=2, default=[s.name for s in SUBJECTS[:2]], choices=[s.name for s in SUBJECTS])
    parser.add_argument("--method", default="moslora-orthogonal", choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="per subject: the pair's run takes twice as many")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--prior_mode", choices=PRIOR_MODES, default="base_model")
    parser.add_argument("--quick", action="store_true", help="one seed, 100 steps per subject")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = [0], 100
    settings = BenchmarkSettings(base_model=args.base_model, analyzer_file=args.analyzer_file,
                                 output_dir=args.output_dir, seeds=tuple(args.seeds), steps=args.steps,
                                 learning_rate=args.learning_rate, prior_mode=args.prior_mode)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    started = time.perf_counter()
    run_multi_concept(settings, tuple(args.pair), args.method, log=log)
    print(f"see {args.output_dir}/results.md; done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
