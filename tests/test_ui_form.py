"""The UI's form and readers without a server: options from the parser, the command line, the checks, the
progress read from a log, the job states read from a folder."""

import json
import shlex

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.memory_plan import PRESET_OPTIONS
from dreambooth_moslora.ui.form import check, command_line, first_run_values, shell_line, train_options
from dreambooth_moslora.ui.jobs import START_MARK, JobStore
from dreambooth_moslora.ui.paths import inside
from dreambooth_moslora.ui.progress import training_progress


def test_options_carry_the_parsers_defaults_choices_and_kinds():
    options = {o.name: o for o in train_options()}
    assert options["learning_rate"].default == "0.0001" and options["learning_rate"].kind == "value"
    assert options["mixer_init"].kind == "choice" and "orthogonal" in options["mixer_init"].choices
    assert options["no_bucketing"].kind == "flag" and options["gradient_checkpointing"].kind == "flag"
    assert options["rank"].group == "adapter"
    assert "instance_prompt" not in options and "use_8bit_adam" not in options  # basic; hidden compatibility


def test_the_command_line_is_what_train_parses():
    form = {**first_run_values(), "preset": "bf16 + gradient checkpointing"}
    form["advanced"] = {**form["advanced"], "rank": "8", "learning_rate": "0.0001", "random_flip": True,
                        "center_crop": False}
    argv = command_line(form, form["photos_folder"], "out")
    args = parse_args(shlex.split(shell_line(argv))[2:])
    assert args.instance_prompt == "a photo of sks star" and args.class_prompt == "a photo of a star"
    assert args.rank == 8 and args.random_flip and not args.center_crop and args.gradient_checkpointing
    assert args.mixed_precision == "bf16" and args.output_dir == "out" and args.max_train_steps == 200
    assert "--learning_rate" not in argv  # the parser's default is not written out
    with pytest.raises(UserInputError, match="unknown preset"):
        command_line({**form, "preset": "fast"}, "photos")
    assert set(PRESET_OPTIONS) == {"bf16", "bf16 + gradient checkpointing", "bf16 + checkpointing + 8-bit AdamW",
                                   "--low_memory (+ fp8 base weights)", "bf16 + checkpointing + text encoders trained"}


@pytest.mark.parametrize("change, field", [
    ({"trigger": ""}, "trigger"),  # no instance prompt: the parser's own message
    ({"pretrained_model_name_or_path": "/no/such/model"}, "pretrained_model_name_or_path"),
    ({"advanced": {"train_trigger_embedding": "xyz"}}, "trigger"),
    ({"advanced": {"mixer_init": "random"}}, "mixer_init"),
])
def test_errors_land_at_the_field_they_name(change, field):
    form = {**first_run_values(), **change}
    errors = check(command_line(form, first_run_values()["photos_folder"]))
    assert list(errors) == [field] and "\n" not in errors[field]


def test_the_progress_is_read_from_the_bar_in_the_log(tmp_path):
    log = tmp_path / "train.log"
    assert training_progress(log)["total"] is None
    log.write_text("caching latents: 100%|██| 25/25 [00:00<00:00, 118.25it/s]\n"
                   "\rsteps:   0%|          | 0/20 [00:00<?, ?it/s]"
                   "\rsteps:   5%|▌         | 1/20 [00:00<00:02,  7.83it/s, loss=0.5000, lr=1.00e-03, s_per_step=0.13]"
                   "\rsteps:  10%|█         | 2/20 [00:01<00:20,  1.50s/it, loss=0.2500, lr=1.00e-03, s_per_step=1.5]")
    progress = training_progress(log)
    assert progress["step"] == 2 and progress["total"] == 20 and progress["losses"] == [(1, 0.5), (2, 0.25)]
    assert progress["steps_per_second"] == pytest.approx(1 / 1.5) and progress["eta_seconds"] == pytest.approx(27)


def test_a_jobs_state_is_read_from_its_folder(tmp_path):
    store = JobStore(tmp_path)
    job_id = store.create("a job", lambda photos: photos.mkdir(), lambda photos, output: ["--output_dir", output],
                          lambda argv: None)
    assert store.state(job_id)["state"] == "waiting"
    store.cancel(job_id)
    assert store.state(job_id)["state"] == "cancelled"
    store.resume(job_id)
    store._write_queue([])
    log = tmp_path / job_id / "train.log"
    for text, state in [(f"{START_MARK} x\n", "failed"), ("error: --rank must be at least 1\n", "failed"),
                        (f"{START_MARK} y\nstopped: interrupted at step 8; saved …\n", "stopped"),
                        (f"{START_MARK} z\ntrained 12 steps in 3.0 s; wrote …\n", "finished")]:
        log.write_text(log.read_text() + text if log.exists() else text)
        assert store.state(job_id)["state"] == state, text
    assert store.state(job_id)["message"].startswith("trained 12 steps")
    # a PID reused by another process is not the job's
    store._write({**store.read(job_id), "pid": 1})
    assert store.state(job_id)["state"] == "finished"
    assert json.loads((tmp_path / job_id / "job.json").read_text())["argv"][-1].endswith("output")


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc/passwd", "", "a\\..\\..\\x"])
def test_paths_out_of_the_root_are_refused(tmp_path, relative):
    with pytest.raises(UserInputError, match="refused"):
        inside(tmp_path, relative)


def test_the_ui_verb_without_its_extra_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import sys

    from dreambooth_moslora.verbs.cli import main

    for module in ("dreambooth_moslora.ui.server", "dreambooth_moslora.ui.app"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["ui", "--jobs_dir", str(tmp_path / "jobs")]) == 2
    assert 'pip install -e ".[ui]"' in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()
