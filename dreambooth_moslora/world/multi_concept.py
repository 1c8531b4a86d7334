"""Two subjects in one adapter against each alone, on the mini world (the dataset file's measurement).

Each subject has a trigger of its own and the personalization benchmark's recipe (its settings: prior, captions,
text-encoder adapters). Per seed, one adapter per subject alone and one on both from a two-concept dataset file,
trained for as many steps per subject (the pair's run takes twice the steps). Each adapter is measured per
subject with that subject's trigger, as the personalization benchmark measures: subject fidelity (normalised
between the untrained model and real-vs-real), prompt fidelity, class shape accuracy, and leakage: the samples'
mean similarity to the *other* subject's photos, which a shared adapter could raise above the subject alone's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ..adapter.files import write_text_atomically
from ..pipeline.generate import GenerationSettings, load_pipeline
from ..pipeline.metrics import mean_cross_similarity
from ..trainer.dataset_config import Concept, DatasetConfig, dataset_toml
from .analyzer import embed, load_analyzer
from .personalization import BenchmarkSettings, SubjectBench, class_images_dir, class_prompts, training_options, train_once
from .report import _cell, _mean_std
from .subjects import subject_by_name

TRIGGERS = ("sks", "zwx")
MEASURES = ("normalized_fidelity", "subject_fidelity", "leakage", "prompt_fidelity", "class_shape_accuracy")


def run_multi_concept(settings: BenchmarkSettings, pair: tuple[str, str], method: str = "moslora-orthogonal",
                      log=print) -> dict:
    """Every adapter's measures per subject and seed, the untrained model's, and results.json/.md. Adapters
    already trained (runs/<adapter>-seed<n>/moslora.safetensors) are measured, not trained again."""
    output_dir = Path(settings.output_dir)
    analyzer = load_analyzer(settings.analyzer_file)
    benches = [SubjectBench(subject_by_name(name), replace(settings, token=token), analyzer, GenerationSettings())
               for name, token in zip(pair, TRIGGERS)]
    results = {"settings": asdict(settings), "pair": list(pair), "method": method,
               "subjects": {b.subject.name: b.record() for b in benches}, "runs": []}
    for bench, other in zip(benches, benches[::-1]):
        untrained = {**bench.record()["untrained"], "leakage": _leakage(bench, other, bench.untrained_samples)}
        results["runs"].append({"adapter": "untrained", "seed": None, "subject": bench.subject.name, **untrained})
    for seed in settings.seeds:
        for label, trained in [*((f"{b.subject.name} alone", [b]) for b in benches), ("both", benches)]:
            run_dir = output_dir / "runs" / f"{label.replace(' ', '-')}-seed{seed}"
            adapter = run_dir / "moslora.safetensors"
            if not adapter.is_file():
                _train_concepts(settings, trained, method, seed, run_dir)
            pipe = load_pipeline(settings.base_model, adapter, GenerationSettings(), device="cpu")
            for bench, other in zip(benches, benches[::-1]):
                if bench not in trained:
                    continue  # an adapter trained without the subject says nothing of it
                metrics, samples = bench.measure_pipeline(pipe)
                record = {"adapter": label, "seed": seed, "subject": bench.subject.name, **metrics,
                          "leakage": _leakage(bench, other, samples)}
                results["runs"].append(record)
                log(f"{label} seed {seed}, {bench.subject.name}: " +
                    ", ".join(f"{m} {record[m]:.3f}" for m in MEASURES))
    write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(output_dir / "results.md", results_table(results))
    return results


def _leakage(bench: SubjectBench, other: SubjectBench, samples: dict) -> float:
    """How much this subject's samples look like the other subject's photos."""
    return mean_cross_similarity(embed(bench.analyzer, samples["instance"]), other.real)


def dataset_of(settings: BenchmarkSettings, benches: list[SubjectBench]) -> DatasetConfig:
    """The subjects as a dataset file's concepts, each with its trigger, its masks and the recipe's prior."""
    concepts = []
    for bench in benches:
        subject = bench.subject
        concept = Concept(name=subject.name, image_dir=bench.instance_dir,
                          instance_prompt=subject.instance_prompt(bench.settings.token), mask_dir=bench.mask_dir)
        if settings.prior_preservation:
            concept = replace(concept, prior=settings.prior_mode, class_prompt=subject.class_prompt,
                              class_prompts=tuple(class_prompts(subject, settings.class_prompts)),
                              num_class_images=settings.num_class_images,
                              class_data_dir=class_images_dir(settings, subject)
                              if settings.prior_mode == "class_images" else None)
        concepts.append(concept)
    return DatasetConfig(tuple(concepts))


def _train_concepts(settings: BenchmarkSettings, benches: list[SubjectBench], method: str, seed: int, run_dir: Path):
    """One run on the subjects' dataset file, as many steps per subject as a subject alone trains."""
    dataset = write_text_atomically(run_dir / "dataset.toml", dataset_toml(dataset_of(settings, benches)))
    steps = replace(settings, steps=settings.steps * len(benches))
    train_once([*training_options(steps, method, seed, settings.learning_rate_of(method), steps.steps, run_dir),
                "--dataset_config", str(dataset), "--sample_batch_size", "25"], run_dir)


def results_table(results: dict) -> str:
    """Mean ± std over seeds, per adapter and subject."""
    lines = [f"Two subjects ({', '.join(results['pair'])}, triggers {', '.join(TRIGGERS)}), {results['method']}: "
             "each alone and both in one adapter. Leakage: the samples' similarity to the other subject's photos.", "",
             "| adapter | subject | " + " | ".join(MEASURES) + " |", "| --- " * (2 + len(MEASURES)) + "|"]
    keys = list(dict.fromkeys((r["adapter"], r["subject"]) for r in results["runs"]))
    for adapter, subject in keys:
        runs = [r for r in results["runs"] if (r["adapter"], r["subject"]) == (adapter, subject)]
        cells = " | ".join(_cell(_mean_std([r[m] for r in runs])) for m in MEASURES)
        lines.append(f"| {adapter} | {subject} | {cells} |")
    return "\n".join(lines) + "\n"
