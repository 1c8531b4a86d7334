"""The UI's form without a server: options from the parser, the command line, the checks, and the ui verb."""

import shlex

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.memory_plan import PRESET_OPTIONS
from dreambooth_moslora.ui.form import check, command_line, first_run_values, shell_line, train_options


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


def test_the_ui_verb_without_its_extra_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import sys

    from dreambooth_moslora.verbs.cli import main

    for module in ("dreambooth_moslora.ui.server", "dreambooth_moslora.ui.app"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["ui", "--jobs_dir", str(tmp_path / "jobs")]) == 2
    assert 'pip install -e ".[ui]"' in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()
