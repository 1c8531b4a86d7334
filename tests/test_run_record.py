"""The run's record: best/ written whole, the history and best/ snapshotted into checkpoints and put back together
on resume, a previous run's files refused or set aside, a baseline that is not a number said."""

import json
import logging
import os
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from dreambooth_moslora import MoSLoRAConfig, inject_moslora, moslora_parameters, save_moslora
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE
from dreambooth_moslora.trainer.checkpoint_choice import ChoiceRule
from dreambooth_moslora.trainer.run_record import (
    BEST_IN_CHECKPOINT,
    PREVIOUS_RUNS,
    RECORD_FILE,
    RunRecord,
    check_previous_run,
    read_best_step,
    set_aside_previous_run,
    write_best,
)
from dreambooth_moslora.trainer.validation_metrics import read_metrics


def _copying(files):
    def write(folder):
        for file in files:
            shutil.copyfile(file, folder / file.name)
    return write


def _adapter_files(folder, contents):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in contents.items():
        (folder / name).write_text(text)
        os.chmod(folder / name, 0o600)  # as diffusers leaves its weight files
        paths.append(folder / name)
    return paths


def test_write_best_replaces_the_old_best_and_a_failure_leaves_it(tmp_path):
    previous = os.umask(0o022)
    try:
        first = _adapter_files(tmp_path / "checkpoint-100", {"a.safetensors": "100", "b.safetensors": "100b"})
        best = write_best(tmp_path, 100, _copying(first))
        second = _adapter_files(tmp_path / "checkpoint-200", {"a.safetensors": "200"})
        write_best(tmp_path, 200, _copying(second))
    finally:
        os.umask(previous)
    assert best == tmp_path / "best"
    assert sorted(p.name for p in best.iterdir()) == ["a.safetensors", "step.json"]  # b is not left over
    assert (best / "a.safetensors").read_text() == "200" and read_best_step(tmp_path) == 200
    assert {p.stat().st_mode & 0o777 for p in best.iterdir()} == {0o644}

    with pytest.raises(FileNotFoundError):
        write_best(tmp_path, 300, _copying([second[0], tmp_path / "checkpoint-300" / "missing.safetensors"]))
    assert (best / "a.safetensors").read_text() == "200" and read_best_step(tmp_path) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint-100", "checkpoint-200"]


def test_read_best_step_without_a_best(tmp_path):
    assert read_best_step(tmp_path) is None


@pytest.fixture(scope="module")
def unet(tiny_sdxl_dir):
    model = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    inject_moslora(model, MoSLoRAConfig(rank=2))
    return model


@pytest.fixture
def adapter_at(unet):
    """A writer of best/'s files whose adapter differs with each step."""
    def writer(step):
        def write(folder):
            torch.manual_seed(step)
            with torch.no_grad():
                for parameter in moslora_parameters(unet):
                    parameter.normal_()
            save_moslora(folder / NATIVE_FILE, unet)
        return write
    return writer


def _measures(fidelity):
    return {"dino": fidelity, "clip_i": fidelity, "clip_t": 0.3, "class_similarity": 0.5}


def _checkpoint(out, step, record):
    folder = out / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "training_state.json").write_text(json.dumps({"global_step": step}))
    record.save_into(folder)
    return folder


def test_a_resume_puts_back_the_history_and_best_of_its_checkpoint_together(adapter_at, tmp_path):
    """Resumed from step 2's checkpoint after best/ moved on to step 3: history, best/step.json, best/'s adapter
    and the summary all say step 1 (the choice when the checkpoint was saved), as they did then."""
    out = tmp_path / "out"
    record = RunRecord.begin(out, ChoiceRule(), None)
    record.record(0, _measures(0.1), adapter_at(0))
    record.record(1, _measures(0.5), adapter_at(1))
    step_1_adapter = (out / "best" / NATIVE_FILE).read_bytes()
    record.record(2, _measures(0.4), adapter_at(2))
    checkpoint = _checkpoint(out, 2, record)
    record.record(3, _measures(0.9), adapter_at(3))
    assert read_best_step(out) == 3

    resumed = RunRecord.begin(out, ChoiceRule(), checkpoint)
    assert [r["step"] for r in read_metrics(out / "validation" / "metrics.jsonl")] == [0, 1, 2]
    assert resumed.chosen == resumed.choice.step == read_best_step(out) == 1
    assert (out / "best" / NATIVE_FILE).read_bytes() == step_1_adapter
    assert {p.name for p in (out / "best").iterdir()} >= {NATIVE_FILE, DIFFUSERS_FILE, KOHYA_FILE}
    assert resumed.summary().startswith("Step 1 was chosen")
    assert [p.name for p in resumed.keep_best()] == sorted(p.name for p in (out / "best").glob("*.safetensors"))
    assert (out / NATIVE_FILE).read_bytes() == step_1_adapter


def test_a_checkpoint_holds_the_record_and_the_chosen_adapter_as_they_were(adapter_at, tmp_path):
    out = tmp_path / "out"
    record = RunRecord.begin(out, ChoiceRule(), None)
    record.record(0, _measures(0.1), adapter_at(0))
    empty = _checkpoint(out, 1, record)
    assert json.loads((empty / RECORD_FILE).read_text()) == {"history": record.history, "chosen": None}
    assert not (empty / BEST_IN_CHECKPOINT).exists()
    record.record(2, _measures(0.5), adapter_at(2))
    folder = _checkpoint(out, 2, record)
    assert (folder / BEST_IN_CHECKPOINT).read_bytes() == (out / "best" / NATIVE_FILE).read_bytes()
    assert json.loads((folder / RECORD_FILE).read_text())["chosen"] == 2
    record.record(3, _measures(0.9), adapter_at(3))  # best/ replaced: the checkpoint's copy is not
    assert (folder / BEST_IN_CHECKPOINT).read_bytes() != (out / "best" / NATIVE_FILE).read_bytes()

    RunRecord.begin(out, ChoiceRule(), empty)  # before anything was chosen: no best/ at all
    assert not (out / "best").exists() and read_best_step(out) is None


def test_a_checkpoint_from_before_records_keeps_best_only_if_chosen_by_its_step(adapter_at, tmp_path, caplog):
    out = tmp_path / "out"
    record = RunRecord.begin(out, ChoiceRule(), None)
    for step, fidelity in [(0, 0.1), (1, 0.5), (2, 0.9)]:
        record.record(step, _measures(fidelity), adapter_at(step))
    old = out / "checkpoint-1"
    old.mkdir()
    (old / "training_state.json").write_text(json.dumps({"global_step": 1}))
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        resumed = RunRecord.begin(out, ChoiceRule(), old)
    assert [r["step"] for r in resumed.history] == [0, 1]
    assert resumed.chosen is None and not (out / "best").exists()
    assert "best/ held step 2" in caplog.text


def test_a_baseline_measure_that_is_not_a_number_is_said(adapter_at, tmp_path, caplog):
    record = RunRecord.begin(tmp_path / "out", ChoiceRule(), None)
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        record.record(0, {**_measures(0.1), "class_similarity": float("nan")}, adapter_at(0))
    assert "step 0's class_similarity is not a number" in caplog.text
    record.record(1, {**_measures(0.5), "class_similarity": 0.99}, adapter_at(1))
    assert record.chosen == 1


def _previous_run(out):
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "best").mkdir()
    (out / "best" / "step.json").write_text('{"step": 2}')
    (out / "validation").mkdir()
    (out / "validation" / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / NATIVE_FILE).write_text("old")
    (out / "README.md").write_text("old card")


def test_a_new_run_in_a_used_folder_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    _previous_run(out)
    with pytest.raises(UserInputError) as refused:
        check_previous_run(out, None, overwrite=False)
    message = str(refused.value)
    assert "\n" not in message and "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert "checkpoint-2/" in message
    with pytest.raises(UserInputError):  # a checkpoint of another folder is not this folder's run continued
        check_previous_run(out, str(tmp_path / "elsewhere" / "checkpoint-5"), overwrite=False)


def test_what_needs_setting_aside(tmp_path):
    out = tmp_path / "out"
    assert not check_previous_run(out, None, overwrite=False)  # nothing there
    (out / "logs").mkdir(parents=True)
    (out / "README.md").write_text("the user's own notes")
    assert not check_previous_run(out, None, overwrite=False)  # no run's files
    _previous_run(out)
    assert check_previous_run(out, None, overwrite=True)
    assert not check_previous_run(out, "latest", overwrite=False)  # continued from its checkpoint
    assert not check_previous_run(out, str(out / "checkpoint-2"), overwrite=False)
    shutil.rmtree(out / "checkpoint-2")
    assert check_previous_run(out, "latest", overwrite=False)  # nothing to continue: its state is set aside


def test_setting_aside_moves_the_previous_run_whole(tmp_path):
    out = tmp_path / "out"
    _previous_run(out)
    (out / "logs").mkdir()
    aside = set_aside_previous_run(out)
    assert aside.parent == out / PREVIOUS_RUNS
    assert sorted(p.name for p in out.iterdir()) == ["logs", PREVIOUS_RUNS]
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["README.md", "best", "checkpoint-2", NATIVE_FILE, "validation"])
    _previous_run(out)
    assert set_aside_previous_run(out) != aside  # a second one beside the first
