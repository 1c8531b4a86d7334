"""DreamBooth on the mini world, measured as the DreamBooth paper measures it (Ruiz et al. 2023, section 4.1).

For every subject x method x seed x prior-preservation setting, train an adapter with the ordinary trainer,
sample the mini model with it, and read the samples with the world analyzer:
- subject fidelity: mean cosine similarity of the analyzer's embedding (the world's DINO) between samples of
  "a photo of a sks star on a blue background" and the real instance images; the real-vs-real mean is the
  ceiling and the untrained model the floor;
- prompt fidelity: how often the analyzer finds the background the prompt names;
- class drift: for the class prompt without the trigger, how often the analyzer still finds the class shape,
  and how much those samples look like the subject (leakage).
Sampling noise is the same for every adapter, so methods are compared on paired samples.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from PIL import Image, ImageDraw

from ..arguments import parse_args
from ..files import save_png_atomically, write_text_atomically
from ..generate import GenerationSettings, load_pipeline
from ..metrics import mean_cross_similarity, mean_self_similarity
from ..train import train
from .analyzer import analyze, embed, load_analyzer
from .pretrain import sample_world
from .render import COLOURS, IMAGE_SIZE
from .subjects import SUBJECTS, Subject, subject_by_name, write_instance_images

METHODS = {
    "lora": ["--mixer_init", "none"],
    "moslora-orthogonal": ["--mixer_init", "orthogonal"],
    "moslora-kaiming": ["--mixer_init", "kaiming"],
    "fixed-orthogonal": ["--mixer_init", "orthogonal", "--freeze_mixer"],
    "fixed-kaiming": ["--mixer_init", "kaiming", "--freeze_mixer"],
}
BASELINE = "lora"


@dataclass
class BenchmarkSettings:
    base_model: str
    analyzer_file: str
    output_dir: str
    subjects: tuple[str, ...] = tuple(s.name for s in SUBJECTS)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    prior_preservation: tuple[bool, ...] = (False, True)
    prior_methods: tuple[str, ...] = ("lora", "moslora-orthogonal")
    """Methods also trained with prior preservation (when prior_preservation has True)."""
    token: str = "sks"
    instance_images: int = 5
    rank: int = 4
    steps: int = 400
    learning_rate: float = 1e-4
    train_batch_size: int = 1
    num_class_images: int = 50
    backgrounds_per_subject: int = 4
    images_per_prompt: int = 4
    inference_steps: int = 20
    guidance_scale: float = 5.0
    sampling_seed: int = 1234
    extra_train_args: list[str] = field(default_factory=list)


def subject_backgrounds(subject: Subject, count: int) -> list[str]:
    """Named backgrounds for the prompt-fidelity prompts: colours the subject itself does not have."""
    return [c for c in COLOURS if c not in subject.colours][:count]


def evaluation_prompts(subject: Subject, settings: BenchmarkSettings, token: str | None) -> list[tuple[str, str]]:
    """(prompt, named background) pairs, each repeated images_per_prompt times. With the token: the subject on
    each background; without: an ordinary member of the class, in one of the world's colours, as pretraining
    captions always name one ("a photo of a blue star on a green background")."""
    backgrounds = subject_backgrounds(subject, settings.backgrounds_per_subject)
    if token:
        prompts = [(f"a photo of a {token} {subject.class_noun} on a {bg} background", bg) for bg in backgrounds]
    else:
        colours = backgrounds[1:] + backgrounds[:1]
        prompts = [(f"a photo of a {c} {subject.class_noun} on a {bg} background", bg) for c, bg in zip(colours, backgrounds)]
    return [pair for pair in prompts for _ in range(settings.images_per_prompt)]


def measure(pipe, analyzer, subject: Subject, real: torch.Tensor, settings: BenchmarkSettings) -> tuple[dict, dict]:
    """The three DreamBooth measures for one pipeline; also returns the samples, for the figure."""
    sampling = dict(steps=settings.inference_steps, guidance_scale=settings.guidance_scale)
    instance = evaluation_prompts(subject, settings, settings.token)
    classes = evaluation_prompts(subject, settings, None)
    instance_images = sample_world(pipe, [p for p, _ in instance], settings.sampling_seed, **sampling)
    class_images = sample_world(pipe, [p for p, _ in classes], settings.sampling_seed, **sampling)
    found = analyze(analyzer, instance_images)
    found_class = analyze(analyzer, class_images)
    metrics = {
        "subject_fidelity": mean_cross_similarity(embed(analyzer, instance_images), real),
        "prompt_fidelity": sum(f["background"] == bg for f, (_, bg) in zip(found, instance)) / len(instance),
        "class_shape_accuracy": sum(f["shape"] == subject.class_noun for f in found_class) / len(classes),
        "class_subject_similarity": mean_cross_similarity(embed(analyzer, class_images), real),
    }
    return metrics, {"instance": instance_images, "class": class_images}


def _train_adapter(settings: BenchmarkSettings, subject: Subject, instance_dir: Path, method: str, seed: int,
                   prior: bool, output_dir: Path) -> Path:
    argv = [
        "--pretrained_model_name_or_path", settings.base_model,
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", subject.instance_prompt(settings.token),
        "--output_dir", str(output_dir),
        "--resolution", str(IMAGE_SIZE),
        "--rank", str(settings.rank),
        "--max_train_steps", str(settings.steps),
        "--learning_rate", str(settings.learning_rate),
        "--train_batch_size", str(settings.train_batch_size),
        "--checkpointing_steps", str(settings.steps),
        "--seed", str(seed),
        *METHODS[method],
        *settings.extra_train_args,
    ]
    if prior:
        argv += [
            "--with_prior_preservation",
            "--class_prompt", subject.class_prompt,
            "--class_data_dir", str(Path(settings.output_dir) / "class-images" / subject.name),
            "--num_class_images", str(settings.num_class_images),
            "--sample_batch_size", "25",
        ]
    try:
        train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir / "moslora.safetensors"


def run_benchmark(settings: BenchmarkSettings, log=print) -> dict:
    """Every run's measures, the untrained floor and real-vs-real ceiling per subject; resumable by run."""
    output_dir = Path(settings.output_dir)
    analyzer = load_analyzer(settings.analyzer_file)
    generation = GenerationSettings()
    results = {"settings": asdict(settings), "subjects": {}, "runs": []}
    figure_rows = []
    for name in settings.subjects:
        subject = subject_by_name(name)
        instance_dir = output_dir / "instance-images" / name
        real_images = [Image.open(p).convert("RGB") for p in write_instance_images(subject, instance_dir, settings.instance_images)]
        real = embed(analyzer, real_images)
        floor, samples = measure(load_pipeline(settings.base_model, None, generation, device="cpu"), analyzer, subject, real, settings)
        results["subjects"][name] = {"real_vs_real": mean_self_similarity(real), "untrained": floor}
        one_per_background = slice(None, None, settings.images_per_prompt)
        row = {"real": real_images, "untrained": samples["instance"][one_per_background]}
        log(f"{name}: real-vs-real {results['subjects'][name]['real_vs_real']:.3f}, untrained {floor}")
        for method, seed, prior in itertools.product(settings.methods, settings.seeds, settings.prior_preservation):
            if prior and method not in settings.prior_methods:
                continue
            run_dir = output_dir / "runs" / name / f"{method}-seed{seed}-{'prior' if prior else 'noprior'}"
            adapter = _train_adapter(settings, subject, instance_dir, method, seed, prior, run_dir)
            metrics, samples = measure(load_pipeline(settings.base_model, adapter, generation, device="cpu"),
                                       analyzer, subject, real, settings)
            results["runs"].append({"subject": name, "method": method, "seed": seed, "prior_preservation": prior, **metrics})
            if seed == settings.seeds[0] and not prior:
                row[method] = samples["instance"][one_per_background]
            log(f"{name} {method} seed {seed} prior {prior}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        figure_rows.append((name, row))
    save_png_atomically(sample_figure(figure_rows), output_dir / "samples.png")
    results["summary"] = summarize(results)
    write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(output_dir / "results.md", results_table(results))
    return results


MEASURES = ("subject_fidelity", "prompt_fidelity", "class_shape_accuracy", "class_subject_similarity")


def sign_flip_p_value(differences: list[float]) -> float:
    """Two-sided paired permutation test: how often random signs give a mean difference at least as large."""
    observed = abs(sum(differences))
    if len(differences) <= 16:
        flips = itertools.product((1, -1), repeat=len(differences))
    else:
        rng = random.Random(0)
        flips = ([rng.choice((1, -1)) for _ in differences] for _ in range(20_000))
    totals = [abs(sum(s * d for s, d in zip(signs, differences))) for signs in flips]
    return sum(t >= observed - 1e-12 for t in totals) / len(totals)


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(results: dict) -> dict:
    """Mean and std over subjects and seeds per (method, prior), and each method paired with LoRA."""
    runs = results["runs"]
    summary = {"methods": {}, "paired_vs_lora": {}}
    for method, prior in itertools.product(results["settings"]["methods"], results["settings"]["prior_preservation"]):
        chosen = [r for r in runs if r["method"] == method and r["prior_preservation"] == prior]
        if not chosen:
            continue
        key = f"{method}|{'prior' if prior else 'no prior'}"
        summary["methods"][key] = {m: _mean_std([r[m] for r in chosen]) for m in MEASURES}
        if method == BASELINE:
            continue
        baseline = {(r["subject"], r["seed"]): r for r in runs if r["method"] == BASELINE and r["prior_preservation"] == prior}
        if not baseline:
            continue
        pairs = [(r, baseline[(r["subject"], r["seed"])]) for r in chosen]
        summary["paired_vs_lora"][key] = {
            m: {"mean_difference": statistics.fmean(a[m] - b[m] for a, b in pairs),
                "p_value": sign_flip_p_value([a[m] - b[m] for a, b in pairs]), "pairs": len(pairs)}
            for m in ("subject_fidelity", "prompt_fidelity")
        }
    floors = [s["untrained"] for s in results["subjects"].values()]
    summary["untrained"] = {m: _mean_std([f[m] for f in floors]) for m in MEASURES}
    summary["real_vs_real"] = _mean_std([s["real_vs_real"] for s in results["subjects"].values()])
    return summary


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def results_table(results: dict) -> str:
    summary = results["summary"]
    lines = [
        "| method | prior preservation | subject fidelity ↑ | prompt fidelity ↑ | class shape accuracy ↑ | class-subject similarity ↓ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in summary["methods"].items():
        method, prior = key.split("|")
        lines.append(f"| {method} | {prior} | " + " | ".join(_cell(row[m]) for m in MEASURES) + " |")
    floor = summary["untrained"]
    lines.append("| untrained (floor) | | " + " | ".join(_cell(floor[m]) for m in MEASURES) + " |")
    lines.append(f"| real vs real (ceiling) | | {_cell(summary['real_vs_real'])} | | | |")
    lines += ["", "Paired with LoRA on the same subject and seed (two-sided sign-flip permutation test):", "",
              "| method | prior preservation | Δ subject fidelity | p | Δ prompt fidelity | p |", "| --- | --- | --- | --- | --- | --- |"]
    for key, row in summary["paired_vs_lora"].items():
        method, prior = key.split("|")
        s, p = row["subject_fidelity"], row["prompt_fidelity"]
        lines.append(f"| {method} | {prior} | {s['mean_difference']:+.4f} | {s['p_value']:.3f} | "
                     f"{p['mean_difference']:+.4f} | {p['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def sample_figure(rows: list[tuple[str, dict]], per_column: int = 3, zoom: int = 3) -> Image.Image:
    """One row per subject: real images, the untrained model, then each method (seed 0, no prior)."""
    cell, label_height = IMAGE_SIZE * zoom, 14
    columns = list(rows[0][1])
    width = len(columns) * per_column * cell + (len(columns) - 1) * 4
    figure = Image.new("RGB", (width, label_height + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(figure)
    for c, column in enumerate(columns):
        left = c * (per_column * cell + 4)
        draw.text((left + 2, 1), column, fill="black")
        for r, (_, images) in enumerate(rows):
            for k, image in enumerate(images[column][:per_column]):
                figure.paste(image.resize((cell, cell), Image.NEAREST), (left + k * cell, label_height + r * (cell + 4)))
    return figure
