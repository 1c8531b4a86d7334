"""DreamBooth on the mini world, measured as the DreamBooth paper measures it (Ruiz et al. 2023, section 4.1).

For every subject x method x seed, train an adapter with the ordinary trainer, sample the mini model with it, and
read the samples with the world analyzer:
- subject fidelity: mean cosine similarity of the analyzer's embedding (the world's DINO) between samples of
  "a photo of a sks star on a blue background" and the real instance images. Two ceilings: real-vs-real (pairs
  of distinct instance images) and the oracle, true renders of the subject on the prompts' backgrounds sent
  through the VAE (what a perfect model could reach); the untrained model is the floor;
- prompt fidelity: how often the analyzer finds the background the prompt names;
- class drift: for the class prompt without the trigger, how often the analyzer still finds the class shape,
  and how much those samples look like the subject (leakage).
Sampling noise is the same for every adapter, so methods are compared on paired samples. Each method's learning
rate and number of steps are chosen on a tuning subject that is not reported (`tune`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from ..adapter.files import save_png_atomically, write_text_atomically
from ..pipeline.generate import GenerationSettings, load_pipeline
from ..pipeline.metrics import mean_cross_similarity, mean_self_similarity
from ..trainer.arguments import parse_args
from ..trainer.train import train
from .analyzer import analyze, embed, load_analyzer
from .pretrain import sample_world, vae_round_trip
from .render import COLOURS, IMAGE_SIZE
from .report import curve_plot, curve_summary, normalized, results_table, sample_figure, summarize
from .subjects import SUBJECTS, TUNING_SUBJECT, Subject, render_subject, subject_by_name, write_instance_images

METHODS = {
    "lora": ["--mixer_init", "none"],
    "moslora-orthogonal": ["--mixer_init", "orthogonal"],
    "moslora-kaiming": ["--mixer_init", "kaiming"],
    "fixed-orthogonal": ["--mixer_init", "orthogonal", "--freeze_mixer"],
    "fixed-kaiming": ["--mixer_init", "kaiming", "--freeze_mixer"],
}


@dataclass
class BenchmarkSettings:
    base_model: str
    analyzer_file: str
    output_dir: str
    subjects: tuple[str, ...] = tuple(s.name for s in SUBJECTS)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    prior_preservation: bool = True
    """The setting every method is compared in."""
    ablation_methods: tuple[str, ...] = ("lora",)
    """Methods also run with prior preservation the other way, to show what it does."""
    prior_mode: str = "class_images"
    masked: bool = False
    """Masked loss on the subject's exact masks (the renderer knows them)."""
    train_text_encoder: bool = True
    """Text-encoder adapters too, at text_encoder_lr_scale times the method's learning rate."""
    text_encoder_lr_scale: float = 1.0
    trigger_embedding_lr: float | None = None
    """With a rate, the trigger's embedding is learned too (--train_trigger_embedding) at that rate."""
    class_prompts: int = 20
    """Class prompts per subject, each naming a colour and a background as the world's captions do (the mini model
    draws poor shapes for a prompt without a colour, so class images of "a photo of a star" would not show stars)."""
    captions: bool = True
    """Each instance image captioned with its background (a same-named .txt), as users caption their photos."""
    token: str = "sks"
    instance_images: int = 5
    rank: int = 4
    steps: int = 400
    """How long every run trains; a method is reported at its tuned step, from that checkpoint."""
    learning_rate: float = 1e-3
    tuned: dict[str, dict] = field(default_factory=dict)
    """Per method, {"learning_rate", "steps"} from `tune`; methods not named use learning_rate and steps. With a
    constant learning rate, the checkpoint at step n is the adapter a run of n steps would give."""
    curve_steps: tuple[int, ...] = (100, 200, 400)
    """Checkpoints measured too, for fidelity against steps."""
    curve_methods: tuple[str, ...] = ("lora", "moslora-orthogonal")
    select_checkpoint: bool = False
    """Report each run at the checkpoint (among curve_steps and steps) a validation measure prefers, as a user picks
    one by comparing checkpoints' samples with their photos; otherwise every run at the method's step."""
    validation_backgrounds: int = 2
    """Backgrounds for that choice: colours the subject lacks and the reported prompts do not name."""
    validation_images_per_prompt: int = 8
    """As many samples as the reported measures take, so the class is judged on as many (one miss in 16 keeps it)."""
    train_batch_size: int = 1
    num_class_images: int = 50
    backgrounds_per_subject: int = 4
    images_per_prompt: int = 4
    inference_steps: int = 20
    guidance_scale: float = 5.0
    sampling_seed: int = 1234
    validation_seed: int = 4321
    extra_train_args: list[str] = field(default_factory=list)

    def learning_rate_of(self, method: str) -> float:
        return self.tuned.get(method, {}).get("learning_rate", self.learning_rate)

    def steps_of(self, method: str) -> int:
        """The tuned step, never past the runs' end (a --quick benchmark trains less than tuning did)."""
        return min(self.tuned.get(method, {}).get("steps", self.steps), self.steps)


def subject_backgrounds(subject: Subject, count: int, skip: int = 0) -> list[str]:
    """Named backgrounds for the prompt-fidelity prompts: colours the subject itself does not have."""
    return [c for c in COLOURS if c not in subject.colours][skip : skip + count]


def validation_backgrounds(subject: Subject, settings: BenchmarkSettings) -> list[str]:
    """The backgrounds a checkpoint is chosen on: none of those the reported measures use."""
    return subject_backgrounds(subject, settings.validation_backgrounds, skip=settings.backgrounds_per_subject)


def evaluation_prompts(subject: Subject, settings: BenchmarkSettings, token: str | None,
                       validation: bool = False) -> list[tuple[str, str]]:
    """(prompt, named background) pairs, each repeated images_per_prompt times (validation: on the validation
    backgrounds). With the token: the subject on each background; without: an ordinary member of the class, in
    one of the world's colours, as pretraining captions always name one ("a photo of a blue star on a green
    background")."""
    if validation:
        backgrounds, repeats = validation_backgrounds(subject, settings), settings.validation_images_per_prompt
    else:
        backgrounds, repeats = subject_backgrounds(subject, settings.backgrounds_per_subject), settings.images_per_prompt
    if token:
        prompts = [(f"a photo of a {token} {subject.class_noun} on a {bg} background", bg) for bg in backgrounds]
    else:
        colours = backgrounds[1:] + backgrounds[:1]
        prompts = [(f"a photo of a {c} {subject.class_noun} on a {bg} background", bg) for c, bg in zip(colours, backgrounds)]
    return [pair for pair in prompts for _ in range(repeats)]


def class_prompts(subject: Subject, count: int) -> list[str]:
    """`count` distinct prompts of the class in the world's words: "a photo of a blue star on a green background"."""
    rng = np.random.default_rng([7, sum(map(ord, subject.name))])
    pairs = [(c, bg) for c in COLOURS for bg in COLOURS if c != bg]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [f"a photo of a {pairs[i][0]} {subject.class_noun} on a {pairs[i][1]} background" for i in chosen]


def measure(pipe, analyzer, subject: Subject, real: torch.Tensor, settings: BenchmarkSettings,
            validation: bool = False) -> tuple[dict, dict]:
    """The three DreamBooth measures for one pipeline; also returns the samples, for the figure. With validation,
    on the validation backgrounds and seed, which the reported measures never see."""
    sampling = dict(steps=settings.inference_steps, guidance_scale=settings.guidance_scale)
    seed = settings.validation_seed if validation else settings.sampling_seed
    instance = evaluation_prompts(subject, settings, settings.token, validation)
    classes = evaluation_prompts(subject, settings, None, validation)
    instance_images = sample_world(pipe, [p for p, _ in instance], seed, **sampling)
    class_images = sample_world(pipe, [p for p, _ in classes], seed, **sampling)
    found = analyze(analyzer, instance_images)
    found_class = analyze(analyzer, class_images)
    metrics = {
        "subject_fidelity": mean_cross_similarity(embed(analyzer, instance_images), real),
        "prompt_fidelity": sum(f["background"] == bg for f, (_, bg) in zip(found, instance)) / len(instance),
        "class_shape_accuracy": sum(f["shape"] == subject.class_noun for f in found_class) / len(classes),
        "class_subject_similarity": mean_cross_similarity(embed(analyzer, class_images), real),
    }
    return metrics, {"instance": instance_images, "class": class_images}


def oracle_fidelity(pipe, analyzer, subject: Subject, real: torch.Tensor, settings: BenchmarkSettings) -> float:
    """What a perfect model would score: fresh renders of the subject on the prompts' backgrounds, through the VAE
    (encode, decode), against the instance images. The real-vs-real ceiling compares photos among themselves,
    backgrounds included, so it sits above anything a sample of another background can reach."""
    rng = np.random.default_rng([settings.sampling_seed, sum(map(ord, subject.name))])
    renders = [render_subject(subject, rng, background=bg) for _, bg in evaluation_prompts(subject, settings, settings.token)]
    return mean_cross_similarity(embed(analyzer, vae_round_trip(pipe, renders)), real)


def _train_adapter(settings: BenchmarkSettings, subject: Subject, instance_dir: Path, mask_dir: Path | None, method: str,
                   seed: int, prior: bool, learning_rate: float, checkpoint_every: int, output_dir: Path) -> Path:
    argv = [
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", subject.instance_prompt(settings.token),
        *training_options(settings, method, seed, learning_rate, checkpoint_every, output_dir),
        *(["--mask_dir", str(mask_dir)] if mask_dir else []),
    ]
    if prior:
        prompts_file = Path(settings.output_dir) / "class-prompts" / f"{subject.name}.txt"
        write_text_atomically(prompts_file, "\n".join(class_prompts(subject, settings.class_prompts)) + "\n")
        argv += ["--with_prior_preservation", "--class_prompt", subject.class_prompt,
                 "--class_prompts_file", str(prompts_file), "--prior_preservation_mode", settings.prior_mode]
        if settings.prior_mode == "class_images":
            argv += ["--class_data_dir", str(class_images_dir(settings, subject)),
                     "--num_class_images", str(settings.num_class_images), "--sample_batch_size", "25"]
    return train_once(argv, output_dir)


def class_images_dir(settings: BenchmarkSettings, subject: Subject) -> Path:
    return Path(settings.output_dir) / "class-images" / subject.name


def train_once(argv: list[str], output_dir: Path) -> Path:
    """One in-process training run; its native adapter file."""
    try:
        train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir / "moslora.safetensors"


def training_options(settings: BenchmarkSettings, method: str, seed: int, learning_rate: float, checkpoint_every: int,
                     output_dir: Path) -> list[str]:
    """Every training option of a benchmark run but its data."""
    return [
        "--pretrained_model_name_or_path", settings.base_model,
        "--output_dir", str(output_dir),
        "--resolution", str(IMAGE_SIZE),
        "--rank", str(settings.rank),
        "--max_train_steps", str(settings.steps),
        "--learning_rate", str(learning_rate),
        "--train_batch_size", str(settings.train_batch_size),
        "--checkpointing_steps", str(checkpoint_every),
        "--report_to", "none",
        "--seed", str(seed),
        *METHODS[method],
        *(["--train_text_encoder", "--text_encoder_lr", str(learning_rate * settings.text_encoder_lr_scale)]
          if settings.train_text_encoder else []),
        *(["--train_trigger_embedding", settings.token, "--trigger_embedding_lr", str(settings.trigger_embedding_lr)]
          if settings.trigger_embedding_lr else []),
        *settings.extra_train_args,
    ]


class SubjectBench:
    """One subject's real images, floor and ceilings, and the measuring of adapters against them."""

    def __init__(self, subject: Subject, settings: BenchmarkSettings, analyzer, generation: GenerationSettings):
        self.subject, self.settings, self.analyzer, self.generation = subject, settings, analyzer, generation
        output_dir = Path(settings.output_dir)
        self.instance_dir = output_dir / "instance-images" / subject.name
        self.mask_dir = output_dir / "instance-masks" / subject.name if settings.masked else None
        paths = write_instance_images(subject, self.instance_dir, settings.instance_images,
                                      caption_token=settings.token if settings.captions else None,
                                      mask_folder=self.mask_dir)
        self.real_images = [Image.open(p).convert("RGB") for p in paths]
        self.real = embed(analyzer, self.real_images)
        base = load_pipeline(settings.base_model, None, generation, device="cpu")
        self.floor, self.untrained_samples = measure(base, analyzer, subject, self.real, settings)
        self.real_vs_real = mean_self_similarity(self.real)
        self.oracle = oracle_fidelity(base, analyzer, subject, self.real, settings)

    def record(self) -> dict:
        return {"real_vs_real": self.real_vs_real, "oracle": self.oracle,
                "untrained": {**self.floor, **self._normalized(self.floor["subject_fidelity"])}}

    def _normalized(self, fidelity: float) -> dict:
        floor = self.floor["subject_fidelity"]
        return {"normalized_fidelity": normalized(fidelity, floor, self.real_vs_real),
                "oracle_normalized_fidelity": normalized(fidelity, floor, self.oracle)}

    def measure_adapter(self, adapter, validation: bool = False) -> tuple[dict, dict]:
        return self.measure_pipeline(load_pipeline(self.settings.base_model, adapter, self.generation, device="cpu"),
                                     validation)

    def measure_pipeline(self, pipe, validation: bool = False) -> tuple[dict, dict]:
        """The reported measures, normalised, and with validation also those a checkpoint is chosen by
        (`validation_*`); also the samples, for the figure."""
        metrics, samples = measure(pipe, self.analyzer, self.subject, self.real, self.settings)
        metrics = {**metrics, **self._normalized(metrics["subject_fidelity"])}
        if validation:
            held_out, _ = measure(pipe, self.analyzer, self.subject, self.real, self.settings, validation=True)
            metrics.update({f"validation_{k}": v for k, v in held_out.items()})
        return metrics, samples

    def train_and_measure(self, method: str, seed: int, prior: bool, learning_rate: float, curve_steps=(),
                          reported_step: int | None = None, want_samples: bool = False) -> tuple:
        """The adapter's measures at reported_step (default: the run's end; with select_checkpoint, the checkpoint
        validation prefers; with its samples when wanted), and at each of curve_steps, from checkpoints. A run
        measured before (its metrics.json) is not trained again: the benchmark resumes, and several processes can
        share its runs (each taking some subjects), a last one writing the report. train_seconds is the whole
        run's, with the subject's class images when this run made them."""
        select = self.settings.select_checkpoint
        reported_step = reported_step or self.settings.steps
        candidates = (*curve_steps, *(self.settings.curve_steps if select else ()), reported_step)
        measured = sorted({step for step in candidates if step <= self.settings.steps})
        tag = f"{method}-lr{learning_rate:g}-seed{seed}-{'prior' if prior else 'noprior'}"
        run_dir = Path(self.settings.output_dir) / "runs" / self.subject.name / tag
        record = run_dir / "metrics.json"
        done = json.loads(record.read_text()) if record.is_file() else None
        if not done or not {p["step"] for p in done["curve"]} >= set(measured):
            started = time.perf_counter()
            _train_adapter(self.settings, self.subject, self.instance_dir, self.mask_dir, method, seed, prior,
                           learning_rate, math.gcd(*measured), run_dir)
            done = {"train_seconds": time.perf_counter() - started, "curve": []}
        points = {p["step"]: p for p in done["curve"]}
        missing = [s for s in measured if s not in points or (select and "validation_subject_fidelity" not in points[s])]
        for step in missing:
            points[step] = {"step": step, **self.measure_adapter(self._adapter_at(run_dir, step), select)[0]}
        if missing:
            done["curve"] = [points[step] for step in sorted(points)]
            write_text_atomically(record, json.dumps(done, indent=2) + "\n")
        if select:
            reported_step = choose_checkpoint([points[step] for step in measured])
        metrics = {**points[reported_step], "train_seconds": done["train_seconds"]}
        samples = self.measure_adapter(self._adapter_at(run_dir, reported_step))[1] if want_samples else None
        return metrics, samples, [points[step] for step in measured if step in curve_steps]

    def _adapter_at(self, run_dir: Path, step: int) -> Path:
        final = step == self.settings.steps
        return run_dir / ("moslora.safetensors" if final else f"checkpoint-{step}/moslora.safetensors")


def run_benchmark(settings: BenchmarkSettings, log=print) -> dict:
    """Every run's measures, the floor and both ceilings per subject, curves, the report files."""
    output_dir = Path(settings.output_dir)
    analyzer = load_analyzer(settings.analyzer_file)
    results = {"settings": asdict(settings), "subjects": {}, "runs": [], "curves": []}
    figure_rows = []
    for name in settings.subjects:
        bench = SubjectBench(subject_by_name(name), settings, analyzer, GenerationSettings())
        results["subjects"][name] = bench.record()
        one_per_background = slice(None, None, settings.images_per_prompt)
        row = {"real": bench.real_images, "untrained": bench.untrained_samples["instance"][one_per_background]}
        log(f"{name}: real-vs-real {bench.real_vs_real:.3f}, oracle {bench.oracle:.3f}, untrained {bench.floor}")
        runs = [(m, s, settings.prior_preservation) for m, s in itertools.product(settings.methods, settings.seeds)]
        runs += [(m, s, not settings.prior_preservation) for m, s in itertools.product(settings.ablation_methods, settings.seeds)]
        for method, seed, prior in runs:
            compared = prior == settings.prior_preservation
            curve_steps = settings.curve_steps if compared and method in settings.curve_methods else ()
            wanted = seed == settings.seeds[0] and compared
            metrics, samples, curve = bench.train_and_measure(method, seed, prior, settings.learning_rate_of(method),
                                                              curve_steps, settings.steps_of(method), wanted)
            keys = {"subject": name, "method": method, "seed": seed, "prior_preservation": prior}
            results["runs"].append({**keys, **metrics})
            results["curves"] += [{**keys, **point} for point in curve]
            if wanted:
                row[method] = samples["instance"][one_per_background]
            log(f"{name} {method} seed {seed} prior {prior}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        figure_rows.append((name, row))
    save_png_atomically(sample_figure(figure_rows), output_dir / "samples.png")
    results["summary"] = summarize(results)
    write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(output_dir / "results.md", results_table(results))
    if results["curves"]:
        plot = curve_plot(curve_summary(results), "subject fidelity against training steps (mean ± std)",
                          "normalised fidelity")
        save_png_atomically(plot, output_dir / "fidelity-vs-steps.png")
    return results


def choose_setting(rows: list[dict], min_class_shape_accuracy: float) -> dict:
    """The (learning rate, steps) with the best subject fidelity among those that keep the class; the best
    fidelity overall when none does."""
    keeping = [r for r in rows if r["class_shape_accuracy"] >= min_class_shape_accuracy] or rows
    best = max(keeping, key=lambda r: r["subject_fidelity"])
    return {"learning_rate": best["learning_rate"], "steps": best["step"]}


def choose_checkpoint(points: list[dict], min_class_shape_accuracy: float = 0.9) -> int:
    """The step whose validation measures choose_setting prefers: the best fidelity among checkpoints that keep the
    class."""
    rows = [{"learning_rate": None, "step": p["step"], "subject_fidelity": p["validation_subject_fidelity"],
             "class_shape_accuracy": p["validation_class_shape_accuracy"]} for p in points]
    return choose_setting(rows, min_class_shape_accuracy)["steps"]


def tune(settings: BenchmarkSettings, learning_rates: tuple[float, ...], seed: int = 0, subject: Subject = TUNING_SUBJECT,
         min_class_shape_accuracy: float = 0.9, log=print) -> dict:
    """Each method's learning rate and steps from one grid (one run per rate, measured at each of curve_steps), on
    the tuning subject alone, in the compared prior setting."""
    output_dir = Path(settings.output_dir)
    bench = SubjectBench(subject, settings, load_analyzer(settings.analyzer_file), GenerationSettings())
    steps = tuple(sorted({*settings.curve_steps, settings.steps}))
    grid = []
    for method, rate in itertools.product(settings.methods, learning_rates):
        _, _, curve = bench.train_and_measure(method, seed, settings.prior_preservation, rate, steps)
        grid += [{"method": method, "learning_rate": rate, **point} for point in curve]
        log(f"tuning {method} lr {rate:g}: " + "; ".join(
            f"step {p['step']} fidelity {p['subject_fidelity']:.3f} class shape {p['class_shape_accuracy']:.3f}"
            for p in curve))
    chosen = {m: choose_setting([r for r in grid if r["method"] == m], min_class_shape_accuracy)
              for m in settings.methods}
    tuning = {"subject": subject.name, "seed": seed, "steps": list(steps), "subject_record": bench.record(),
              "min_class_shape_accuracy": min_class_shape_accuracy, "grid": grid, "chosen": chosen}
    write_text_atomically(output_dir / "tuning.json", json.dumps(tuning, indent=2) + "\n")
    write_text_atomically(output_dir / "tuning.md", tuning_table(tuning))
    return tuning


def tuning_table(tuning: dict) -> str:
    lines = [f"Tuning subject {tuning['subject']} (seed {tuning['seed']}), measured at steps "
             f"{', '.join(map(str, tuning['steps']))}; chosen: the best subject fidelity with class shape accuracy "
             f"≥ {tuning['min_class_shape_accuracy']}.", "",
             "| method | learning rate | step | subject fidelity | normalised (real) | normalised (oracle) | "
             "class shape accuracy | class-subject similarity | chosen |", "| --- " * 9 + "|"]
    for row in tuning["grid"]:
        chosen = "✓" if tuning["chosen"][row["method"]] == {"learning_rate": row["learning_rate"], "steps": row["step"]} else ""
        lines.append(f"| {row['method']} | {row['learning_rate']:g} | {row['step']} | {row['subject_fidelity']:.3f} | "
                     f"{row['normalized_fidelity']:.3f} | {row['oracle_normalized_fidelity']:.3f} | "
                     f"{row['class_shape_accuracy']:.3f} | {row['class_subject_similarity']:.3f} | {chosen} |")
    return "\n".join(lines) + "\n"
