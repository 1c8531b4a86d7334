"""What the job page shows, read from the job's folder: the progress bar's lines in train.log (steps, rate,
loss), validation/metrics.jsonl, the validation samples and the chosen step. Only reads, so the training process
never waits for the UI."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from ..trainer.checkpoint import checkpoints
from ..trainer.run_record import read_best_step
from ..trainer.validation_metrics import read_metrics, scalars

# tqdm's line of the training loop: "steps:  45%|████| 9/20 [00:02<00:02, 4.4it/s, loss=0.0258, lr=1.00e-03, …]"
STEP_LINE = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^<\]]*<[^,\]]*,\s*([\d.]+|\?)(it/s|s/it)"
                       r"(?:, loss=([-+\w.]+))?")
SAMPLE_NAME = re.compile(r"(\d{3})-(\d+)\.png")


def training_progress(log: Path) -> dict:
    """{"step", "total", "steps_per_second", "eta_seconds", "losses": [[step, loss], …]} from the log's bars."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    losses, last = {}, None
    for match in STEP_LINE.finditer(text):
        last = match
        if match.group(5):
            try:
                losses[int(match.group(1))] = float(match.group(5))
            except ValueError:
                pass
    if last is None:
        return {"step": 0, "total": None, "steps_per_second": None, "eta_seconds": None, "losses": []}
    step, total = int(last.group(1)), int(last.group(2))
    rate = None if last.group(3) == "?" else float(last.group(3))
    rate = 1 / rate if rate and last.group(4) == "s/it" else rate
    return {"step": step, "total": total, "steps_per_second": rate,
            "eta_seconds": (total - step) / rate if rate else None, "losses": sorted(losses.items())}


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


def job_report(folder: Path) -> dict:
    output = folder / "output"
    return {"progress": training_progress(folder / "train.log"),
            "metrics": [{"step": r["step"], **scalars(r)} for r in read_metrics(output / "validation" / "metrics.jsonl")],
            "samples": samples_grid(output), "checkpoints": checkpoint_names(output)}
