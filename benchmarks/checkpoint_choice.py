"""The trainer's own choice of step (measured validation, checkpoint_choice's rule) on the mini world, against the
best step in hindsight and the fixed-step recipe: the measurement issue 26 asks for, and how its tolerance is
chosen (on the tuning subjects, never on the reported ones).

    python benchmarks/checkpoint_choice.py --subjects checked-kite blue-heart    # the tuning subjects: choose
    python benchmarks/checkpoint_choice.py --subjects striped-hexagram dotted-egg checked-house --seeds 0 1 2 \
        --methods lora moslora-orthogonal

Each run trains the quick start's recipe (--methods: MoSLoRA or LoRA, base-model prior, text-encoder adapters, lr 1e-3) for --steps
with a checkpoint and a measured validation (the world analyzer) every --every steps; then every checkpoint is
measured with the benchmark's reported measures (other backgrounds and seeds than validation's): normalised subject
fidelity, class shape accuracy, prompt fidelity. The rule is then replayed on the run's validation/metrics.jsonl for
each class tolerance of --tolerances (no retraining), and early stopping for each patience of --patiences.
Runs already trained and measured are reused. Writes results.json and results.md to --output_dir.
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

from dreambooth_moslora.adapter.files import write_text_atomically  # noqa: E402
from dreambooth_moslora.pipeline.generate import GenerationSettings  # noqa: E402
from dreambooth_moslora.trainer.checkpoint_choice import ChoiceRule, choose, should_stop_early  # noqa: E402
from dreambooth_moslora.trainer.validation_metrics import read_metrics  # noqa: E402
from dreambooth_moslora.world.analyzer import load_analyzer  # noqa: E402
from dreambooth_moslora.world.personalization import (  # noqa: E402
    METHODS, BenchmarkSettings, SubjectBench, _train_adapter, evaluation_prompts,
)
from dreambooth_moslora.world.subjects import ALL_SUBJECTS, subject_by_name  # noqa: E402

CLASS_SHAPE_GOAL = 0.95


def run_dir(settings: BenchmarkSettings, subject, method: str, seed: int) -> Path:
    return Path(settings.output_dir) / "runs" / subject.name / f"{method}-seed{seed}"


def train_and_measure(settings: BenchmarkSettings, bench: SubjectBench, method: str, seed: int, every: int,
                      log) -> dict:
    """The run's trainer history and the reported measures of each of its checkpoints (cached in measures.json)."""
    folder = run_dir(settings, bench.subject, method, seed)
    record = folder / "measures.json"
    if record.is_file():
        return json.loads(record.read_text())
    validation_prompt = evaluation_prompts(bench.subject, settings, settings.token, validation=True)[0][0]
    settings.extra_train_args = ["--validation_prompt", validation_prompt, "--validation_steps", str(every),
                                 "--validation_metrics_model", settings.analyzer_file,
                                 "--num_validation_images", "4", "--num_inference_steps", str(settings.inference_steps)]
    started = time.perf_counter()
    if not (folder / f"checkpoint-{settings.steps}").is_dir():  # a run trained this far already is measured as it is
        _train_adapter(settings, bench.subject, bench.instance_dir, None, method, seed, True, settings.learning_rate,
                       every, folder)
    seconds = time.perf_counter() - started
    steps = list(range(every, settings.steps + 1, every))
    reported = {}
    for step in steps:  # every step is checkpointed, the last one too
        reported[step] = bench.measure_adapter(folder / f"checkpoint-{step}" / "moslora.safetensors")[0]
        log(f"{bench.subject.name} {method} seed {seed} step {step}: normalised fidelity "
            f"{reported[step]['normalized_fidelity']:.3f}, class shape {reported[step]['class_shape_accuracy']:.2f}")
    result = {"subject": bench.subject.name, "method": method, "seed": seed, "train_seconds": seconds,
              "history": read_metrics(folder / "validation" / "metrics.jsonl", up_to_step=settings.steps),
              "reported": {str(step): metrics for step, metrics in reported.items()}}
    write_text_atomically(record, json.dumps(result, indent=2) + "\n")
    return result


def replay(run: dict, tolerance: float, patience: int | None, fixed_step: int) -> dict:
    """The step the rule chooses (stopping early with patience), the best in hindsight, and the fixed step; each
    with its reported normalised fidelity and class shape accuracy."""
    history, reported = run["history"], {int(k): v for k, v in run["reported"].items()}
    rule = ChoiceRule(class_tolerance=tolerance)
    stopped_at = history[-1]["step"]
    for end in range(1, len(history) + 1):
        if should_stop_early(choose(history[:end], rule), patience):
            stopped_at = history[end - 1]["step"]
            break
    chosen = choose([r for r in history if r["step"] <= stopped_at], rule).step
    keeping = [s for s, m in reported.items() if m["class_shape_accuracy"] >= CLASS_SHAPE_GOAL] or list(reported)
    hindsight = max(keeping, key=lambda s: reported[s]["normalized_fidelity"])

    def at(step):
        return {"step": step, "fidelity": reported[step]["normalized_fidelity"],
                "class_shape": reported[step]["class_shape_accuracy"],
                "prompt_fidelity": reported[step]["prompt_fidelity"]}

    return {"chosen": at(chosen) if chosen in reported else None, "hindsight": at(hindsight), "fixed": at(fixed_step),
            "stopped_at": stopped_at}


def summary_table(runs: list[dict], tolerances, patiences, fixed_step: int) -> tuple[list[dict], str]:
    rows = []
    for tolerance in tolerances:
        for patience in patiences:
            replays = [replay(run, tolerance, patience, fixed_step) for run in runs]
            chosen = [r["chosen"] for r in replays if r["chosen"]]
            mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
            rows.append({
                "class_tolerance": tolerance, "patience": patience, "runs": len(runs), "chose": len(chosen),
                "chosen_fidelity": mean([c["fidelity"] for c in chosen]),
                "hindsight_fidelity": mean([r["hindsight"]["fidelity"] for r in replays]),
                "fixed_fidelity": mean([r["fixed"]["fidelity"] for r in replays]),
                "worst_against_fixed": min((r["chosen"]["fidelity"] - r["fixed"]["fidelity"]) for r in replays
                                           if r["chosen"]) if chosen else float("nan"),
                "chosen_class_shape": mean([c["class_shape"] for c in chosen]),
                "chosen_prompt_fidelity": mean([c["prompt_fidelity"] for c in chosen]),
                "mean_stop_step": mean([r["stopped_at"] for r in replays]),
                "per_run": [{"subject": run["subject"], "seed": run["seed"], **r} for run, r in zip(runs, replays)],
            })
    lines = [f"| class tolerance | patience | chosen (runs) | fidelity chosen | hindsight | fixed step {fixed_step} | "
             "worst chosen − fixed | class shape chosen | prompt fidelity chosen | mean stop step |",
             "| --- " * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['class_tolerance']:g} | {r['patience'] or '-'} | {r['chose']}/{r['runs']} | "
                     f"{r['chosen_fidelity']:.3f} | {r['hindsight_fidelity']:.3f} | {r['fixed_fidelity']:.3f} | "
                     f"{r['worst_against_fixed']:+.3f} | {r['chosen_class_shape']:.3f} | "
                     f"{r['chosen_prompt_fidelity']:.3f} | {r['mean_stop_step']:.0f} |")
    return rows, "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", nargs="+", default=["checked-kite", "blue-heart"], choices=[s.name for s in ALL_SUBJECTS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=["moslora-orthogonal"], choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--fixed_step", type=int, default=400, help="the recipe's fixed step (the benchmark's tuned one)")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2, 1.0])
    parser.add_argument("--patiences", nargs="+", type=int, default=[0, 3, 5], help="0: no early stopping")
    parser.add_argument("--results_name", default="results", help="results.json/.md: tuning and reported apart")
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "personalization" / "checkpoint-choice"))
    args = parser.parse_args(argv)
    settings = BenchmarkSettings(base_model=str(ROOT / "assets" / "mini-sdxl"),
                                 analyzer_file=str(ROOT / "assets" / "world-analyzer.safetensors"),
                                 output_dir=args.output_dir, prior_mode="base_model", steps=args.steps)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    analyzer = load_analyzer(settings.analyzer_file)
    runs = []
    for name in args.subjects:
        bench = SubjectBench(subject_by_name(name), settings, analyzer, GenerationSettings())
        for seed in args.seeds:
            for method in args.methods:
                runs.append(train_and_measure(settings, bench, method, seed, args.every, log))
                log(f"{name} {method} seed {seed} done")
    patiences = [p or None for p in args.patiences]
    tables = []
    for method in args.methods:
        rows, table = summary_table([r for r in runs if r["method"] == method], args.tolerances, patiences,
                                    args.fixed_step)
        tables.append((method, rows, table))
    output = Path(args.output_dir)
    stem = args.results_name
    write_text_atomically(output / f"{stem}.json", json.dumps(
        {"args": vars(args), "methods": {method: rows for method, rows, _ in tables}}, indent=2) + "\n")
    markdown = "".join(f"\n{method}:\n\n{table}" for method, _, table in tables)
    write_text_atomically(output / f"{stem}.md", f"`python {' '.join(sys.argv)}`\n{markdown}")
    print(markdown)


if __name__ == "__main__":
    main()
