"""The personalization benchmark on the mini world: DreamBooth with MoSLoRA, LoRA and fixed-mixer controls.

    python benchmarks/personalization.py --tune   # each method's learning rate and steps, on the tuning subject alone
    python benchmarks/personalization.py          # 3 subjects x 3 seeds x 5 methods at those rates, + LoRA without prior
    python benchmarks/personalization.py --quick  # one subject, one seed, LoRA and MoSLoRA: a CI-sized check
    python benchmarks/personalization.py --select_checkpoint --steps 1600 --curve_steps 100 200 400 800 1600
                                                  # each run at the checkpoint a validation measure prefers

Runs already measured (runs/<subject>/<run>/metrics.json) are not trained again, so an interrupted benchmark
resumes, and several processes can share one: start one per subject (--subjects ...), then one with all subjects
to write the report. Writes tuning.json/.md, or results.json, results.md (mean ± std over subjects and seeds, paired tests against
LoRA), samples.png and fidelity-vs-steps.png to --output_dir (default benchmarks/personalization/), plus every
run's adapter under runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_moslora.trainer.arguments import PRIOR_MODES  # noqa: E402
from dreambooth_moslora.world.personalization import (  # noqa: E402
    METHODS, BenchmarkSettings, run_benchmark, tune,
)
from dreambooth_moslora.world.subjects import DIAGNOSIS_SUBJECTS, SUBJECTS, TUNING_SUBJECTS, subject_by_name  # noqa: E402


def main(argv=None):
    defaults = BenchmarkSettings(base_model="", analyzer_file="", output_dir="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=str(ROOT / "assets" / "mini-sdxl"))
    parser.add_argument("--analyzer_file", default=str(ROOT / "assets" / "world-analyzer.safetensors"))
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "personalization"))
    parser.add_argument("--tune", action="store_true", help="choose each method's learning rate and steps on the tuning subject")
    parser.add_argument("--tune_learning_rates", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--tuning_subject", default=TUNING_SUBJECTS[0].name,
                        choices=[s.name for s in (*TUNING_SUBJECTS, *DIAGNOSIS_SUBJECTS)],
                        help="the subject --tune measures (a diagnosis subject only tells why a subject is slow)")
    parser.add_argument("--quick", action="store_true", help="one subject, one seed, LoRA and MoSLoRA, 200 steps")
    parser.add_argument("--subjects", nargs="+", default=list(defaults.subjects), choices=[s.name for s in SUBJECTS])
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=list(METHODS))
    parser.add_argument("--ablation_methods", nargs="*", default=list(defaults.ablation_methods), choices=list(METHODS),
                        help="also run these with prior preservation the other way")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    parser.add_argument("--prior", choices=("on", "off"), default="on", help="the setting methods are compared in")
    parser.add_argument("--prior_mode", choices=PRIOR_MODES, default=defaults.prior_mode)
    parser.add_argument("--no_captions", action="store_true", help="train on the bare instance prompt")
    parser.add_argument("--no_text_encoder", action="store_true", help="adapt the UNet only")
    parser.add_argument("--text_encoder_lr_scale", type=float, default=defaults.text_encoder_lr_scale,
                        help="the text-encoder adapters' learning rate as a multiple of the method's")
    parser.add_argument("--trigger_embedding_lr", type=float, default=None,
                        help="also learn the trigger's embedding, at this rate (default: not learned)")
    parser.add_argument("--masked", action="store_true", help="masked loss on the subjects' exact masks")
    parser.add_argument("--extra_train_args", default="", help="more training options, e.g. --extra_train_args=--use_ema")
    for name in ("rank", "steps", "train_batch_size", "images_per_prompt", "inference_steps", "num_class_images"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--curve_steps", nargs="*", type=int, default=list(defaults.curve_steps))
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="one rate for every method, reported at --steps (default: each method's rate and steps from tuning.json)")
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--select_checkpoint", action="store_true",
                        help="report each run at the checkpoint among --curve_steps and --steps that a validation "
                             "measure (other backgrounds, other sampling seed) prefers")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.seeds, args.methods, args.ablation_methods = args.subjects[:1], [0], ["lora", "moslora-orthogonal"], []
        args.steps, args.curve_steps = 200, [100, 200]
    output_dir = Path(args.output_dir)
    settings = BenchmarkSettings(
        base_model=args.base_model, analyzer_file=args.analyzer_file, output_dir=args.output_dir,
        subjects=tuple(args.subjects), methods=tuple(args.methods), ablation_methods=tuple(args.ablation_methods),
        seeds=tuple(args.seeds), prior_preservation=args.prior == "on", prior_mode=args.prior_mode,
        captions=not args.no_captions, train_text_encoder=not args.no_text_encoder,
        text_encoder_lr_scale=args.text_encoder_lr_scale, trigger_embedding_lr=args.trigger_embedding_lr,
        masked=args.masked,
        extra_train_args=args.extra_train_args.split(), rank=args.rank, steps=args.steps, train_batch_size=args.train_batch_size,
        images_per_prompt=args.images_per_prompt, inference_steps=args.inference_steps,
        num_class_images=args.num_class_images, guidance_scale=args.guidance_scale, curve_steps=tuple(args.curve_steps),
        select_checkpoint=args.select_checkpoint,
    )
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.tune:
        tuning = tune(settings, tuple(args.tune_learning_rates), seed=args.seeds[0],
                      subject=subject_by_name(args.tuning_subject), log=log)
        print(f"chosen: {tuning['chosen']}; see {output_dir}/tuning.md")
    else:
        tuning_file = output_dir / "tuning.json"
        if args.learning_rate is not None:
            settings.learning_rate = args.learning_rate
        elif tuning_file.is_file():
            settings.tuned = json.loads(tuning_file.read_text())["chosen"]
            log(f"learning rates and steps from {tuning_file}: {settings.tuned}")
        run_benchmark(settings, log=log)
        print(f"see {output_dir}/results.md, samples.png and fidelity-vs-steps.png")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
