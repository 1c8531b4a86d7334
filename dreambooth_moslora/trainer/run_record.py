"""The one owner of a run's measured state: the validation history (validation/metrics.jsonl, step 0's baseline in
it) and the chosen step with its adapter (best/).

The report, the model card, --keep best, early stopping and the UI read these files; only RunRecord writes them.
Every checkpoint carries a snapshot of the record (its history and the chosen step's adapter), so a resume puts
history and best/ back as they were at that step, together, as transformers' Trainer keeps its TrainerState.
A new run never inherits a previous run's state: the folder's previous run is refused or set aside before any model
loads (`check_previous_run`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..adapter.errors import UserInputError
from ..adapter.files import write_atomically, write_folder_atomically, write_text_atomically
from ..adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, TRIGGER_FILE, read_moslora
from .checkpoint import PREFIX, checkpoint_state, checkpoints
from .checkpoint_choice import SUBJECT_MEASURES, ChoiceRule, baseline_of, choose, should_stop_early
from .outputs import exports_of
from .validation_metrics import append_metrics, read_metrics

logger = logging.getLogger(__name__)
BEST_FOLDER = "best"
STEP_FILE = "step.json"
VALIDATION_FOLDER = "validation"
METRICS_FILE = "metrics.jsonl"
RECORD_FILE = "run_record.json"
"""In a checkpoint: the history and the chosen step as they were when it was saved."""
BEST_IN_CHECKPOINT = "best_moslora.safetensors"
"""In a checkpoint: the chosen step's native adapter (best/'s), from which best/ is rebuilt on resume."""
PREVIOUS_RUNS = "previous-runs"
ADAPTER_FILES = (NATIVE_FILE, DIFFUSERS_FILE, KOHYA_FILE, TRIGGER_FILE)


class RunRecord:
    """The history and the chosen step; best/ holds the chosen step's files (or does not exist) and
    validation/metrics.jsonl the history, whenever a RunRecord method returns."""

    def __init__(self, output_dir, rule: ChoiceRule, history: list[dict], chosen: int | None):
        self.output_dir, self.rule = Path(output_dir), rule
        self.history, self.chosen = history, chosen
        self.choice = choose(history, rule)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / VALIDATION_FOLDER / METRICS_FILE

    @classmethod
    def begin(cls, output_dir, rule: ChoiceRule, checkpoint: Path | None) -> "RunRecord":
        """A new run starts empty; a resume takes the record its checkpoint holds, and metrics.jsonl and best/ are
        made to say the same (a history and a best/ from after the checkpoint are the abandoned future)."""
        output_dir = Path(output_dir)
        if checkpoint is None:
            record = cls(output_dir, rule, [], None)
        elif (Path(checkpoint) / RECORD_FILE).is_file():
            saved = json.loads((Path(checkpoint) / RECORD_FILE).read_text(encoding="utf-8"))
            record = cls(output_dir, rule, saved["history"], saved["chosen"])
        else:
            record = cls._from_files_before_records(output_dir, rule, checkpoint)
        record._put_back_best(checkpoint)
        write_text_atomically(record.metrics_path, "".join(json.dumps(r) + "\n" for r in record.history))
        return record

    @classmethod
    def _from_files_before_records(cls, output_dir: Path, rule: ChoiceRule, checkpoint: Path) -> "RunRecord":
        """A checkpoint from before run records: the history up to its step; best/ only if chosen by then."""
        step = checkpoint_state(checkpoint)["global_step"]
        history = read_metrics(output_dir / VALIDATION_FOLDER / METRICS_FILE, up_to_step=step)
        best = read_best_step(output_dir)
        if best is not None and best > step:
            logger.warning("best/ held step %d, after %s: it is removed (the checkpoint keeps no earlier best); a "
                           "later validation chooses again", best, checkpoint)
            best = None
        return cls(output_dir, rule, history, best)

    def _put_back_best(self, checkpoint: Path | None):
        best = self.output_dir / BEST_FOLDER
        if self.chosen is None:
            shutil.rmtree(best, ignore_errors=True)
        elif read_best_step(self.output_dir) != self.chosen:
            saved = Path(checkpoint) / BEST_IN_CHECKPOINT
            write_best(self.output_dir, self.chosen, lambda folder: adapter_files_from_native(saved, folder))
            logger.info("best/ rebuilt from %s: step %d, the chosen step when it was saved", checkpoint, self.chosen)

    @property
    def has_baseline(self) -> bool:
        return any(record["step"] == 0 for record in self.history)

    def measured(self, step: int) -> bool:
        return any(record["step"] == step for record in self.history)

    def record(self, step: int, measures: dict, write_adapter: Callable[[Path], object]) -> dict:
        """Add a step's measures and choose again; best/ first, then the history, so that after a crash between
        the two the resume's reconciliation has the newest best at hand."""
        record = {"step": step, **measures}
        if step == 0:
            _warn_of_unusable_baseline(record)
        self.history = [r for r in self.history if r["step"] < step] + [record]
        self.choice = choose(self.history, self.rule)
        if self.choice.step == step:
            write_best(self.output_dir, step, write_adapter)
            self.chosen = step
        append_metrics(self.metrics_path, record)
        checkpoint = self.output_dir / f"{PREFIX}{step}"
        if checkpoint.is_dir():  # saved before this validation: it now holds it too, so no resume redoes it
            self.save_into(checkpoint)
        return record

    def should_stop(self, patience: int | None) -> bool:
        return should_stop_early(self.choice, patience)

    def save_into(self, checkpoint_folder: Path):
        """The record and the chosen step's native adapter (a hard link where the filesystem allows) into a
        checkpoint being written."""
        target = Path(checkpoint_folder) / BEST_IN_CHECKPOINT
        if self.chosen is None:
            target.unlink(missing_ok=True)
        else:
            staged = target.with_name(f".{target.name}.tmp")
            staged.unlink(missing_ok=True)
            try:
                os.link(self.output_dir / BEST_FOLDER / NATIVE_FILE, staged)
            except OSError:
                shutil.copyfile(self.output_dir / BEST_FOLDER / NATIVE_FILE, staged)
            os.replace(staged, target)
        write_text_atomically(Path(checkpoint_folder) / RECORD_FILE,
                              json.dumps({"history": self.history, "chosen": self.chosen}))

    def summary(self) -> str | None:
        """The model card's sentence on the chosen step, when there is one."""
        record = next((r for r in self.history if r["step"] == self.chosen), None)
        return None if record is None else self.rule.reason(record, baseline_of(self.history))

    def keep_best(self) -> list[Path]:
        """--keep best: the chosen step's files replace the last step's in the output folder."""
        if self.chosen is None:
            return []
        return [write_atomically(self.output_dir / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
                for path in sorted((self.output_dir / BEST_FOLDER).glob("*.safetensors"))]


def _warn_of_unusable_baseline(record: dict):
    """A tolerance against a step-0 measure that is not a number cannot be applied: said, not silently skipped."""
    records = [record, *record.get("subjects", {}).values()]
    broken = sorted({key for r in records for key, value in r.items() if isinstance(value, float)
                     and not math.isfinite(value) and key not in SUBJECT_MEASURES})
    if broken:
        logger.warning("step 0's %s is not a number: its tolerance is not applied this run, so steps are chosen "
                       "on subject fidelity alone for it", ", ".join(broken))


def adapter_files_from_native(native: Path, folder: Path) -> list[Path]:
    """best/'s files from a native adapter file: itself and the exports a finished run writes beside it."""
    copy = Path(shutil.copyfile(native, folder / NATIVE_FILE))
    return [copy, *exports_of(copy, folder, trigger=bool(read_moslora(copy).trigger_vectors))]


def write_best(output_dir, step: int, files: Callable[[Path], object]) -> Path:
    """Replace <output_dir>/best/ with the step's files (written by `files` into the folder it is given) and
    best/step.json, swapped in whole, so a crash or a missing file leaves the previous best."""
    def fill(staging: Path):
        files(staging)
        (staging / STEP_FILE).write_text(json.dumps({"step": step}), encoding="utf-8")

    return write_folder_atomically(Path(output_dir) / BEST_FOLDER, fill)


def read_best_step(output_dir) -> int | None:
    """The step best/ holds; None when no best was written."""
    path = Path(output_dir) / BEST_FOLDER / STEP_FILE
    return int(json.loads(path.read_text(encoding="utf-8"))["step"]) if path.is_file() else None


def previous_run_files(output_dir) -> list[Path]:
    """What a run leaves in its output folder: checkpoints, best/, validation/, the adapter files and the card."""
    output_dir = Path(output_dir)
    found = [*checkpoints(output_dir), *(output_dir / name for name in (BEST_FOLDER, VALIDATION_FOLDER))]
    if (output_dir / NATIVE_FILE).is_file():
        found.append(output_dir / "README.md")
    found += [output_dir / name for name in ADAPTER_FILES]
    return [path for path in found if path.exists()]


def check_previous_run(output_dir, resume: str | None, overwrite: bool) -> bool:
    """Whether a previous run's files must be set aside before this run starts; a refusal in one line when the
    user said neither to continue that run nor to start afresh. A resume with no checkpoint to resume from
    (`latest` before the first save) sets aside what the run left, since nothing of it can be continued."""
    output_dir = Path(output_dir)
    found = previous_run_files(output_dir)
    if not found:
        return False
    resuming_here = resume and (resume == "latest" or Path(resume).resolve().parent == output_dir.resolve())
    if resuming_here:
        return resume == "latest" and not checkpoints(output_dir)
    if overwrite:
        return True
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:4]) + (", ..." if len(found) > 4 else "")
    raise UserInputError(f"--output_dir {output_dir} holds a previous run ({names}): continue it with "
                         "--resume_from_checkpoint latest, start afresh with --overwrite_output_dir (which moves those "
                         f"files into {PREVIOUS_RUNS}/), or choose another --output_dir")


def set_aside_previous_run(output_dir) -> Path:
    """Move the previous run's files into previous-runs/<time>/: nothing of it is read, chosen or exported as
    this run's, and nothing is lost."""
    output_dir = Path(output_dir)
    aside = output_dir / PREVIOUS_RUNS / time.strftime("%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    aside.mkdir(parents=True)
    for path in previous_run_files(output_dir):
        path.rename(aside / path.name)
    logger.warning("the previous run's files in %s were moved into %s", output_dir, aside)
    return aside

