"""Training checkpoints in safetensors and JSON only: the adapter, the optimizer state, the step and LR schedule.

All randomness in training is a function of (seed, micro-batch number, process), so no RNG state needs saving:
a run resumed with the same processes, batch size and accumulation (which number the micro-batches) draws exactly
what an uninterrupted one would. fp16's GradScaler (its scale and growth tracker) is saved with the schedule.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..adapter.errors import UserInputError
from ..adapter.files import write_folder_atomically, write_text_atomically
from ..adapter.inject import moslora_config, moslora_layers
from ..adapter.io import NATIVE_FILE, copy_adapter_weights, read_moslora, save_moslora, write_safetensors
from ..adapter.trigger import trigger_embedding
from .ema import EMA_FILE, TRAINED_FILE, adapter_parameters, averaged_weights, copy_stored

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"


def checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(output_dir, step: int, models: dict, optimizer, lr_scheduler, base_model: str, ema=None,
                    base_model_sha256: str | None = None, grad_scaler=None, schedule: dict | None = None,
                    dataset: str | None = None, run_record=None) -> Path:
    """Written into a temporary folder and renamed, so a crash never leaves a half checkpoint (nor the folder).
    `schedule` records what the LR schedule was built for ({"name", "steps"}) and `dataset` the data as a dataset
    file (dataset_toml), so a resume can tell a change; `run_record` (a RunRecord) saves its snapshot too."""
    def fill(staging: Path):
        with averaged_weights(ema):  # the adapter validation showed at this step, for export and evaluate
            save_moslora(staging / NATIVE_FILE, models["unet"], models.get("text_encoder"),
                         models.get("text_encoder_2"), base_model=base_model, base_model_sha256=base_model_sha256)
        tensors, metadata = _flatten_optimizer(optimizer.state_dict())
        write_safetensors(tensors, staging / OPTIMIZER_FILE, metadata)
        if ema is not None:
            ema.save(staging)
        state = {"global_step": step, "lr_scheduler": lr_scheduler.state_dict(), "schedule": schedule,
                 "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None, "dataset": dataset}
        write_text_atomically(staging / STATE_FILE, json.dumps(state, default=float))
        if run_record is not None:
            run_record.save_into(staging)

    return write_folder_atomically(Path(output_dir) / f"{PREFIX}{step}", fill)


def prune_checkpoints(output_dir, keep: int | None):
    if keep is not None:
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)


def resolve_checkpoint(output_dir, spec: str) -> Path | None:
    """'latest' is the newest checkpoint in output_dir (None when there is none yet); else a folder."""
    if spec == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise UserInputError(f"not a training checkpoint: {path} (no {STATE_FILE} in it)")
    return path


def weights_are_finite(models: dict) -> bool:
    return all(torch.isfinite(p).all() for p in adapter_parameters(models).values())


def last_good_checkpoint(output_dir) -> str:
    """The newest checkpoint whose adapter is finite, in words (older runs' checkpoints were not checked on save)."""
    for path in reversed(checkpoints(output_dir)):
        try:
            tensors = load_file(str(path / NATIVE_FILE))
        except (SafetensorError, OSError):
            continue
        if all(torch.isfinite(t).all() for t in tensors.values()):
            return f"the last good checkpoint is {path}"
    return "no good checkpoint was saved yet"


def checkpoint_state(path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(path, models: dict, optimizer, lr_scheduler, ema=None, grad_scaler=None) -> int:
    """Restore adapter weights, optimizer, schedule, GradScaler and the weights' average; returns the step to
    continue from. A checkpoint of a run with --use_ema resumed without it continues from the weights as trained
    (its adapter file holds their average), and says that the average is dropped."""
    path = Path(path)
    if ema is not None and not (path / EMA_FILE).is_file():
        raise UserInputError(f"{path} was trained without --use_ema; resume it without --use_ema, or start afresh")
    adapter = read_moslora(path / NATIVE_FILE)
    for component in set(adapter.trigger_vectors) - set(models):
        _restore_trigger(path, component, None, adapter)
    for component, model in models.items():
        config = moslora_config(model) if moslora_layers(model) else None
        if adapter.configs.get(component) != config:
            raise UserInputError(
                f"{path} was trained with another {component} adapter ({adapter.configs.get(component)}); "
                f"this run uses {config}"
            )
        if config is not None:
            copy_adapter_weights(model, adapter.modules[component])
        _restore_trigger(path, component, model, adapter)
    try:
        with safe_open(str(path / OPTIMIZER_FILE), framework="pt") as handle:
            optimizer.load_state_dict(_unflatten_optimizer(handle))
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise UserInputError(f"{path / OPTIMIZER_FILE} is not a usable optimizer state ({error})") from None
    if ema is not None:
        ema.load(path)
    elif (path / EMA_FILE).is_file():
        if (path / TRAINED_FILE).is_file():
            copy_stored(path / TRAINED_FILE, adapter_parameters(models))
        logger.warning("%s was trained with --use_ema: without it the run goes on from the weights as trained and "
                       "the moving average is dropped (add --use_ema to continue both)", path)
    state = checkpoint_state(path)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if grad_scaler is not None and state.get("grad_scaler"):
        grad_scaler.load_state_dict(state["grad_scaler"])
    return int(state["global_step"])


@torch.no_grad()
def _restore_trigger(path, component, model, adapter):
    trigger = trigger_embedding(model) if model is not None else None
    saved = adapter.trigger_vectors.get(component)
    if (trigger is None) != (saved is None) or (trigger is not None and trigger.token != adapter.trigger_token):
        raise UserInputError(f"{path} was trained with another trigger embedding for {component} "
                             f"({adapter.trigger_token!r}); this run learns "
                             f"{trigger.token if trigger else 'none'!r}")
    if trigger is not None:
        trigger.vector.copy_(saved)


def _flatten_optimizer(state_dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def _unflatten_optimizer(handle) -> dict:
    metadata = handle.metadata()
    state: dict[int, dict] = {}
    for key in handle.keys():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = handle.get_tensor(key)
    for param_id, values in json.loads(metadata["scalars"]).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}
