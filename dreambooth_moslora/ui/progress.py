"""What the job page shows, read from the job's folder: the progress bar's lines in train.log (steps, loss, each
step's time), validation/metrics.jsonl with what each measure means, the validation samples and the chosen step.
Only reads, so the training process never waits for the UI."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from PIL import Image

from ..trainer.arguments import build_parser
from ..trainer.checkpoint import checkpoints
from ..trainer.run_record import read_best_step
from ..trainer.validation_metrics import read_metrics, scalars

# tqdm's line of the training loop:
# "steps:  45%|████| 9/20 [00:02<00:02, 4.4it/s, loss=0.0258, lr=1.00e-03, s_per_step=0.21]"
STEP_LINE = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^<\]]*<[^,\]]*,\s*([\d.]+|\?)(it/s|s/it)"
                       r"(?:, loss=([-+\w.]+))?(?:[^\]\r\n]*?s_per_step=([\d.]+))?")
SAMPLE_NAME = re.compile(r"(\d{3})-(\d+)\.png")
RECENT_STEPS = 50
"""A step's usual time is the median of the last RECENT_STEPS steps' times: the steps that waited for a validation
or a checkpoint are outliers it ignores."""
MEASURES = {
    "subject": "likeness of the samples to your photos (the mini world's analyzer); higher is better",
    "dino": "likeness of the samples to your photos (DINO image features); higher is better",
    "clip_i": "likeness of the samples to your photos (CLIP image features); higher is better",
    "clip_t": "how well the samples follow their prompts (CLIP); should stay near step 0's",
    "class_similarity": "how much the class prompt's samples look like your subject; a rise means the class is "
                        "being forgotten (drift), so lower is better",
}
"""What each measure of validation_metrics means, as the job page explains it beside its chart."""


@dataclass
class Bar:
    """What the progress bar's lines say: the last step and total, and each step's loss and time in seconds."""

    step: int = 0
    total: int | None = None
    rate: float | None = None  # tqdm's steps per second
    losses: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def step_seconds(self) -> float | None:
        recent = [self.seconds[s] for s in sorted(self.seconds)[-RECENT_STEPS:]]
        return median(recent) if recent else 1 / self.rate if self.rate else None


def read_bar(log: Path) -> Bar:
    """The bar's lines of the whole log (a step logged twice, as after a resume, keeps its last line)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    bar = Bar()
    for match in STEP_LINE.finditer(text):
        step, total, rate, unit, loss, seconds = match.groups()
        bar.step, bar.total = int(step), int(total)
        bar.rate = None if rate == "?" or not float(rate) else float(rate) if unit == "it/s" else 1 / float(rate)
        try:
            bar.losses[bar.step] = float(loss)
        except (TypeError, ValueError):  # no loss yet, or "nan"-like text float() refuses
            pass
        if seconds:
            bar.seconds[bar.step] = float(seconds)
    return bar


def job_args(job: dict) -> argparse.Namespace:
    """A job's `train` options as the trainer reads them from its job.json's arguments."""
    return build_parser().parse_known_args(job["argv"])[0]


def training_progress(log: Path, args: argparse.Namespace, output: Path) -> dict:
    """{"step", "total", "steps_per_second", "losses": [[step, loss], …], "eta_seconds", "validations_left",
    "validation_seconds"}. The time left counts the validations still to come (each as long as one took, when
    one has been timed: else eta_seconds is the training's alone and the page says so)."""
    bar = read_bar(log)
    step_seconds = bar.step_seconds()
    validations = validations_left(args, bar.step, bar.total, output) if bar.total else 0
    one_validation = validation_seconds(bar, step_seconds, output)
    eta = None if bar.total is None or step_seconds is None else \
        (bar.total - bar.step) * step_seconds + validations * (one_validation or 0)
    return {"step": bar.step, "total": bar.total, "steps_per_second": 1 / step_seconds if step_seconds else None,
            "losses": sorted(bar.losses.items()), "eta_seconds": eta, "validations_left": validations,
            "validation_seconds": one_validation}


def validations_left(args: argparse.Namespace, step: int, total: int, output: Path) -> int:
    """Those due after `step`: one every --validation_steps before the last step, and the final one, unless written."""
    if not args.validation_prompt:
        return 0
    every = args.validation_steps
    mid_run = (total - 1) // every - step // every if every else 0
    final_done = any(found and found[1] and found[0] >= step
                     for found in map(_step_of, (output / "validation").glob("final-step-*")))
    return max(0, mid_run) + (0 if final_done else 1)


def validation_seconds(bar: Bar, step_seconds: float | None, output: Path) -> float | None:
    """How long one validation takes, from those finished (before the bar's step): what the step after a mid-run
    one took beyond a usual step (it waited for it); before any, the spread of a validation's samples (its prompts
    are sampled one after another); None when neither is known yet."""
    done = {found: folder for folder, found in ((f, _step_of(f)) for f in (output / "validation").glob("*step-*"))
            if found and found[0] < bar.step}
    waits = [bar.seconds[step + 1] - step_seconds for step, final in done
             if step and not final and step + 1 in bar.seconds and step_seconds is not None]
    if waits:
        return max(0.0, median(waits))
    spreads = [s for s in map(_sampling_seconds, done.values()) if s is not None]
    return median(spreads) if spreads else None


def _sampling_seconds(folder: Path) -> float | None:
    """From the samples' times: the first image of each of P prompts, P - 1 intervals apart, the first one an
    interval after the validation began."""
    firsts: dict[int, float] = {}
    for image in folder.glob("*.png"):
        name = SAMPLE_NAME.fullmatch(image.name)
        if name:
            prompt = int(name.group(1))
            firsts[prompt] = min(firsts.get(prompt, float("inf")), image.stat().st_mtime)
    if len(firsts) < 2:
        return None
    times = sorted(firsts.values())
    return (times[-1] - times[0]) * len(times) / (len(times) - 1)


def measures(metrics: list[dict]) -> dict[str, str]:
    """Each measure of the history with what it means, in MEASURES' order (subject fidelity first), the means of a
    several-subject run before each subject's own ("name/measure")."""
    rank = {measure: index for index, measure in enumerate(MEASURES)}

    def place(name: str):
        subject, _, measure = name.rpartition("/")
        return bool(subject), rank.get(measure, len(rank)), name

    explained = {}
    for name in sorted({name for record in metrics for name in record if name != "step"}, key=place):
        subject, _, measure = name.rpartition("/")
        meaning = MEASURES.get(measure, "")
        explained[name] = f"{meaning} ({subject} alone)" if subject and meaning else meaning
    return explained


def _step_of(folder: Path) -> tuple[int, bool] | None:
    found = re.fullmatch(r"(final-)?step-(\d+)", folder.name)
    return (int(found.group(2)), bool(found.group(1))) if found else None


def prompt_of(image: Path) -> str:
    """The prompt generate_images wrote into the PNG's A1111-style `parameters` text."""
    try:
        with Image.open(image) as opened:
            return opened.text.get("parameters", "").split("\n", 1)[0]
    except OSError:
        return ""


def samples_grid(output: Path) -> dict:
    """{"prompts": [...], "rows": [{"step", "final", "cells": [[relative paths of prompt i], …]}]}, a row per
    validation in step order, a column per prompt; the chosen step too."""
    rows, prompts = [], {}
    folders = [(f, _step_of(f)) for f in (output / "validation").glob("*step-*") if f.is_dir()]
    for folder, (step, final) in sorted(((f, s) for f, s in folders if s), key=lambda item: item[1]):
        cells: dict[int, list[str]] = {}
        for image in sorted(folder.glob("*.png")):
            name = SAMPLE_NAME.fullmatch(image.name)
            if name:
                cells.setdefault(int(name.group(1)), []).append(str(image.relative_to(output.parent)))
                prompts.setdefault(int(name.group(1)), image)
        columns = range(max(cells, default=-1) + 1)
        rows.append({"step": step, "final": final, "cells": [cells.get(i, []) for i in columns]})
    return {"prompts": [prompt_of(prompts[i]) for i in sorted(prompts)], "rows": rows,
            "best_step": read_best_step(output)}


def checkpoint_names(output: Path) -> list[str]:
    """The adapters a job can download or generate with: "final", "best", then checkpoint-N, when present."""
    names = [name for name, folder in (("final", output), ("best", output / "best"))
             if (folder / "moslora.safetensors").is_file()]
    return names + [c.name for c in checkpoints(output)]


def job_report(folder: Path, job: dict) -> dict:
    """What the job page polls for, of a job (its job.json) and its folder."""
    output = folder / "output"
    metrics = [{"step": r["step"], **scalars(r)} for r in read_metrics(output / "validation" / "metrics.jsonl")]
    return {"progress": training_progress(folder / "train.log", job_args(job), output), "metrics": metrics,
            "measures": measures(metrics), "samples": samples_grid(output), "checkpoints": checkpoint_names(output)}
