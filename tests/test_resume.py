"""Resuming reproduces the uninterrupted run, with every option that touches a step's randomness or state; a
diverged run names a checkpoint that is really good."""

import logging

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from conftest import training_argv
from dreambooth_moslora.adapter.inject import moslora_parameters
from dreambooth_moslora.trainer import train as train_module
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.train import TrainingDiverged, train
from helpers import write_images, write_two_subjects

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture
def subject(tmp_path):
    paths = write_images(tmp_path / "subject", sizes=((64, 64), (80, 64), (64, 72)))
    (tmp_path / "masks").mkdir()
    for path in paths:  # the left half is the subject
        width, height = Image.open(path).size
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 2] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / path.name)
    return tmp_path / "subject"


def run(tiny_sdxl_dir, subject, output_dir, *extra, steps):
    result = train(parse_args(training_argv(tiny_sdxl_dir, subject, output_dir, *extra, steps=steps)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


@pytest.mark.parametrize("options", [
    ("--caption_dropout", "0.5", "--lr_scheduler", "linear", "--random_flip"),
    ("--mask_dir", "{masks}", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"),
    ("--with_prior_preservation", "--prior_preservation_mode", "base_model", "--class_prompt", "a photo of a dog",
     "--lr_scheduler", "polynomial", "--train_batch_size", "2"),
    ("--train_text_encoder", "--text_encoder_lr", "1e-3", "--lr_scheduler", "cosine_with_restarts"),
], ids=["caption-dropout-linear", "masks-cosine", "base-model-prior-polynomial", "text-encoders"])
def test_an_interrupted_run_resumed_is_the_straight_run(tiny_sdxl_dir, subject, tmp_path, options):
    options = tuple(o.format(masks=tmp_path / "masks") for o in options) + ("--checkpointing_steps", "2")
    straight = run(tiny_sdxl_dir, subject, tmp_path / "straight", *options, "--max_train_steps", "4", steps=None)
    # the same command, stopped after step 2 (as Ctrl-C or a crash leaves it), then resumed
    stop_after_two = train_module.TrainingLoop.run

    def interrupted(self, training_set, global_step, max_steps, stop, save):
        return stop_after_two(self, training_set, global_step, 2, stop, save)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.TrainingLoop, "run", interrupted)
        run(tiny_sdxl_dir, subject, tmp_path / "split", *options, "--max_train_steps", "4", steps=None)
    resumed = run(tiny_sdxl_dir, subject, tmp_path / "split", *options, "--max_train_steps", "4",
                  "--resume_from_checkpoint", "latest", steps=None)
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)
    a, b = (load_file(tmp_path / d / "moslora.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_multi_concept_run_resumed_is_the_straight_run(tiny_sdxl_dir, tmp_path):
    """Two subjects, repeats, a base-model prior, masks and a shared class concept, with random crops, flips and
    EMA: a file's run stopped after step 2 and resumed is the straight run."""
    dataset = write_two_subjects(tmp_path)

    def argv(output, *extra):
        return ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--output_dir", str(tmp_path / output),
                "--dataset_config", str(dataset), "--resolution", "64", "--learning_rate", "1e-3",
                "--report_to", "none", "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip",
                "--train_batch_size", "2", "--lr_scheduler", "cosine", "--use_ema", *extra]

    def run_file(*args):
        result = train(parse_args(argv(*args)))
        AcceleratorState._reset_state(reset_partial_state=True)
        return result

    straight = run_file("straight")
    stop_after_two = train_module.TrainingLoop.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.TrainingLoop, "run", lambda self, data, step, _, stop, save: stop_after_two(
            self, data, step, 2, stop, save))
        run_file("split")
    resumed = run_file("split", "--resume_from_checkpoint", "latest")
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)
    a, b = (load_file(tmp_path / d / "moslora.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_extending_a_decaying_schedule_says_the_run_is_not_the_straight_one(tiny_sdxl_dir, subject, tmp_path, caplog):
    options = ("--lr_scheduler", "linear", "--checkpointing_steps", "2")
    run(tiny_sdxl_dir, subject, tmp_path / "out", *options, steps=2)
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        run(tiny_sdxl_dir, subject, tmp_path / "out", *options, "--resume_from_checkpoint", "latest", steps=4)
    assert any("was built for 2 steps" in r.getMessage() and "straight 4-step run" in r.getMessage()
               for r in caplog.records)


def test_a_resume_on_an_edited_dataset_file_says_what_changed(tiny_sdxl_dir, tmp_path, caplog):
    dataset = write_two_subjects(tmp_path)

    def run_file(*extra, steps):
        train(parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config", str(dataset),
                          "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--report_to", "none",
                          "--checkpointing_steps", "1", "--max_train_steps", str(steps), *extra]))
        AcceleratorState._reset_state(reset_partial_state=True)

    run_file(steps=1)
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        run_file("--resume_from_checkpoint", "latest", steps=2)  # the same file: nothing to say
        assert not any("data changed" in r.getMessage() for r in caplog.records)
        dataset.write_text(dataset.read_text().replace("repeats = 2", "repeats = 3"))
        run_file("--resume_from_checkpoint", "latest", steps=3)
    changed = [r.getMessage() for r in caplog.records if "data changed" in r.getMessage()]
    assert len(changed) == 1 and "was repeats = 2" in changed[0] and "now repeats = 3" in changed[0]


def test_a_run_whose_weights_diverge_names_the_last_finite_checkpoint(tiny_sdxl_dir, subject, tmp_path, monkeypatch):
    """The weights turn non-finite in step 2 while its loss was still finite: checkpoint-2 would hold them."""
    step = train_module.TrainingLoop.micro_step

    def poisoned(self, number, *rest):
        loss = step(self, number, *rest)
        if number == 1:
            with torch.no_grad():
                moslora_parameters(self.accelerator.unwrap_model(self.trained["unet"]))[0].fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_module.TrainingLoop, "micro_step", poisoned)
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is .*checkpoint-1") as raised:
        run(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "1", steps=5)
    assert "checkpoint-2" not in str(raised.value).replace("checkpoint-2 was not written", "")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / "out" / "moslora.safetensors").exists()


def test_the_runs_grad_scaler_is_saved_with_its_checkpoints_and_restored_on_resume(tiny_sdxl_dir, subject, tmp_path,
                                                                                  monkeypatch):
    """fp16 on a GPU gives the Accelerator a GradScaler; a CPU one stands in for it here, so the wiring from the
    run to its checkpoints and back is tested where no GPU is."""
    import json

    scalers, accelerator_init = [], train_module.Accelerator.__init__

    def with_a_scaler(self, *args, **kwargs):
        accelerator_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        scalers.append(self.scaler)

    monkeypatch.setattr(train_module.Accelerator, "__init__", with_a_scaler)
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "2", steps=2)
    state_file = tmp_path / "out" / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["grad_scaler"]["scale"] == scalers[0].get_scale() != 2.0**10  # it grew, and was saved as it was
    state["grad_scaler"]["scale"] = 12345.0  # a scale no new scaler starts from
    state_file.write_text(json.dumps(state))
    run(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest",
        steps=3)
    resumed = json.loads((tmp_path / "out" / "checkpoint-3" / "training_state.json").read_text())["grad_scaler"]
    assert resumed["scale"] == 12345.0 * 2  # the restored scale, grown once in step 3
