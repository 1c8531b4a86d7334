"""What a run writes and reads back: checkpoints (only from finite weights), resuming from one, and the finished
run's adapter files and model card."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from ..adapter.adapters import recorded_base_sha256
from ..adapter.errors import UserInputError
from ..adapter.files import write_text_atomically
from ..adapter.inject import moslora_config
from ..adapter.io import (DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, TRIGGER_FILE, export_diffusers, export_kohya,
                          export_trigger_embedding, save_moslora)
from ..pipeline.models import model_reference
from ..pipeline.single_file import base_model_sha256, check_same_base
from .checkpoint import (checkpoint_state, last_good_checkpoint, load_checkpoint, prune_checkpoints,
                         resolve_checkpoint, save_checkpoint, weights_are_finite)
from .dataset_config import dataset_toml
from .model_card import model_card

logger = logging.getLogger(__name__)
DIVERGENCE_ADVICE = "Lower --learning_rate, or use --mixed_precision bf16 instead of fp16."


class TrainingDiverged(UserInputError):
    """The loss or the weights stopped being finite; nothing is written for the run, checkpoints are kept."""


def check_resume_base(args, output_dir):
    """Resuming on another single-file base is caught before any model is loaded."""
    path = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if path is not None:
        check_same_base(recorded_base_sha256(path / NATIVE_FILE), args.pretrained_model_name_or_path, path)


def resume(args, output_dir, adapted, optimizer, lr_scheduler, ema, grad_scaler, max_steps: int) -> tuple[int, Path | None]:
    """The step to continue from and the checkpoint it was read from (None: a run from step 0)."""
    if not args.resume_from_checkpoint:
        return 0, None
    path = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if path is None:
        logger.info("no checkpoint in %s yet; starting from step 0", output_dir)
        return 0, None
    step = load_checkpoint(path, adapted, optimizer, lr_scheduler, ema, grad_scaler)
    logger.info("resumed from %s at step %d", path, step)
    state = checkpoint_state(path)
    built_for = state.get("schedule")
    if built_for and built_for != _schedule(args, max_steps) and "constant" not in {built_for["name"], args.lr_scheduler}:
        logger.warning("the %s learning-rate schedule of %s was built for %d steps; from step %d it follows a %s "
                       "schedule for %d steps, so the run is not the one a straight %d-step run would have made",
                       built_for["name"], path, built_for["steps"], step, args.lr_scheduler, max_steps, max_steps)
    _warn_of_changed_data(state.get("dataset"), dataset_toml(args.dataset), path)
    return step, path


def _warn_of_changed_data(trained_on: str | None, now: str, path: Path):
    """A resume on edited data is allowed (more photos, another weight), but said: it is not the run it was."""
    if trained_on is None or trained_on == now:
        return
    before, after = trained_on.splitlines(), now.splitlines()
    gone, new = [line for line in before if line not in after], [line for line in after if line not in before]
    logger.warning("the data changed since %s (%s): the run resumes on the data as it is now",
                   path, "; ".join([*(f"was {line}" for line in gone[:3]), *(f"now {line}" for line in new[:3])])
                   or "the concepts' order")


def _schedule(args, max_steps: int) -> dict:
    return {"name": args.lr_scheduler, "steps": max_steps}


def write_checkpoint(args, output_dir, step, accelerator, adapted, optimizer, lr_scheduler, ema, max_steps: int,
                     run_record=None):
    """Only from finite weights (every process checks its identical copy, so all stop together), so the newest
    checkpoint is always one to go back to; with the run's record (the main process's) as it is at this step."""
    if not weights_are_finite(adapted):
        raise TrainingDiverged(f"the adapter's weights became non-finite by step {step}; checkpoint-{step} was not "
                               f"written and no adapter was; {last_good_checkpoint(output_dir)}. {DIVERGENCE_ADVICE}")
    path = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        path = save_checkpoint(output_dir, step, adapted, optimizer, lr_scheduler,
                               model_reference(args.pretrained_model_name_or_path), ema,
                               base_model_sha256(args.pretrained_model_name_or_path), accelerator.scaler,
                               _schedule(args, max_steps), dataset_toml(args.dataset), run_record)
        prune_checkpoints(output_dir, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return path


def adapter_files(args, folder: Path, adapted) -> list[Path]:
    """The native file, then the exports of it, into folder."""
    native = save_moslora(folder / NATIVE_FILE, adapted["unet"], adapted.get("text_encoder"),
                          adapted.get("text_encoder_2"), base_model=model_reference(args.pretrained_model_name_or_path),
                          base_model_sha256=base_model_sha256(args.pretrained_model_name_or_path))
    return [native, *exports_of(native, folder, trigger=bool(args.train_trigger_embedding))]


def exports_of(native: Path, folder: Path, trigger: bool) -> list[Path]:
    """The plain-LoRA exports a finished run writes beside its native file (and the trigger's embedding)."""
    files = [export_diffusers(native, folder / DIFFUSERS_FILE), export_kohya(native, folder / KOHYA_FILE)]
    if trigger:
        files.append(export_trigger_embedding(native, folder / TRIGGER_FILE))
    return files


def write_outputs(args, output_dir, adapted, steps, images, run_record=None) -> list[Path]:
    """The adapter files (the chosen step's with --keep best), then the model card; the chosen step is the run
    record's, the one best/ holds."""
    kept_best = run_record.keep_best() if run_record and args.keep == "best" else []
    files = kept_best or adapter_files(args, output_dir, adapted)
    prompts = "; ".join(args.dataset.instance_prompts)
    card = model_card(model_reference(args.pretrained_model_name_or_path), prompts,
                      moslora_config(adapted["unet"]), steps, args.train_text_encoder, args.validation_prompt, images,
                      output_dir, ema_decay=args.ema_decay if args.use_ema else None,
                      model_config=args.model_config and str(Path(args.model_config).expanduser().resolve()),
                      trigger=args.train_trigger_embedding,
                      chosen=run_record.summary() if run_record else None, files_step=run_record.chosen if kept_best else steps)
    return files + [write_text_atomically(output_dir / "README.md", card)]


def print_summary(steps, seconds, files, device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"peak GPU memory {peak:.2f} GiB"
    else:
        memory = f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    per_step = seconds / steps if steps else float("nan")
    print(f"trained {steps} steps in {seconds:.1f} s ({per_step:.2f} s/step), {memory}; "
          f"wrote {', '.join(str(f) for f in files)}", flush=True)
