"""The training form, derived from `train`'s own parser: its advanced options, the command it makes, its checks.

The parser (trainer/arguments.py) is the one source of every option's name, default, help and choices, so the form
never disagrees with `train --help`, and input is checked by the same code as on the command line, giving the
CLI's one-line errors, each placed at the field its option names.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..adapter.errors import UserInputError
from ..trainer.arguments import build_parser, validate_args
from ..trainer.data import read_examples
from ..trainer.memory_plan import (CARD_SIZES_GB, GIB, PRESET_OPTIONS, model_configs, plan_memory, plan_settings,
                                   presets)
from .jobs import option_words

PROG = "dreambooth-moslora train"
# Set by the form's first section (or by the job itself), not among the advanced options.
BASIC = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_prompt", "output_dir",
         "resume_from_checkpoint")
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class Option:
    name: str  # without the dashes
    kind: str  # "flag" (given or not), "choice" or "value"
    default: str
    help: str
    group: str
    choices: tuple[str, ...] = ()


def train_options() -> list[Option]:
    """Every `train` option of the advanced section, in the parser's order and groups; hidden ones left out."""
    options = []
    for group in build_parser(PROG)._action_groups:
        for action in group._group_actions:
            name = action.option_strings[-1][2:] if action.option_strings else ""
            if not name or name in BASIC or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flag = action.nargs == 0
            default = "" if flag or action.default is None else str(action.default)
            kind = "flag" if flag else "choice" if action.choices else "value"
            options.append(Option(name, kind, default, action.help or "", group.title,
                                  tuple(map(str, action.choices or ()))))
    return options


def first_run_values() -> dict:
    """The quick start's recipe on the bundled mini model, so a new user can press Start offline (README)."""
    if not (ASSETS / "mini-sdxl").is_dir():
        return {}
    return {
        "pretrained_model_name_or_path": str(ASSETS / "mini-sdxl"), "photos_folder": str(ASSETS / "world-subject"),
        "trigger": "sks", "class_word": "star",
        "advanced": {"train_text_encoder": True, "text_encoder_lr": "1e-3", "learning_rate": "1e-3",
                     "max_train_steps": "200", "with_prior_preservation": True,
                     "prior_preservation_mode": "base_model",
                     "class_prompts_file": str(ASSETS / "world-class-prompts.txt"), "checkpointing_steps": "100",
                     "validation_steps": "100", "resolution": "32",
                     "validation_prompt": "a photo of a sks star on a blue background", "num_validation_images": "4",
                     "validation_metrics_model": str(ASSETS / "world-analyzer.safetensors")},
    }


def instance_prompt(trigger: str, class_word: str) -> str:
    return f"a photo of {trigger} {class_word}".strip()


def command_line(form: dict, photos_folder: str, output_dir: str | None = None) -> list[str]:
    """The `train` arguments of a form: {"pretrained_model_name_or_path", "trigger", "class_word", "preset" (a
    name of the memory plan's table, or none), "advanced": {option: value or True}}. The preset's options come
    first, so an advanced option overrides them; only what differs from the parser's default is written."""
    argv = ["--pretrained_model_name_or_path", form.get("pretrained_model_name_or_path", ""),
            "--instance_data_dir", photos_folder]
    if form.get("trigger"):  # without one, train's own "required: --instance_prompt" lands at the trigger field
        argv += ["--instance_prompt", instance_prompt(form["trigger"], form.get("class_word", ""))]
    if form.get("class_word"):
        argv += ["--class_prompt", f"a photo of a {form['class_word']}"]
    if form.get("preset"):
        if form["preset"] not in PRESET_OPTIONS:
            raise UserInputError(f"unknown preset {form['preset']!r}; one of {', '.join(PRESET_OPTIONS)}")
        argv += ["--mixed_precision", "bf16", *PRESET_OPTIONS[form["preset"]]]
    known = {o.name: o for o in train_options()}
    for name, value in (form.get("advanced") or {}).items():
        option = known.get(name)
        if option is None:
            raise UserInputError(f"unrecognized argument --{name}")
        if option.kind == "flag":
            argv += [f"--{name}"] if value is True or value == "on" else []
        elif value not in (None, "") and str(value) != option.default:
            argv += option_words(name, str(value))
    return argv + (["--output_dir", output_dir] if output_dir else [])


def shell_line(argv: list[str]) -> str:
    """What "Copy as command" shows: the exact command, quoted for a POSIX shell."""
    return " ".join(["dreambooth-moslora", "train", *map(shlex.quote, argv)])


def check(argv: list[str]) -> dict[str, str]:
    """The CLI's errors for these arguments, by the option each names ("form" when none), and the photos' own.
    Empty when `train` would start: nothing is loaded and nothing written."""
    parser = build_parser(PROG)

    def refuse(status=0, message=None):  # the parser's exit, which would print its line and leave the process
        raise UserInputError((message or "").strip().removeprefix("error: "))

    parser.exit = refuse
    try:
        args = validate_args(parser.parse_args(argv))
        read_examples(args.instance_data_dir, args.instance_prompt, args.resolution, args.bucketing)
        return {}
    except UserInputError as error:
        message = str(error)
    named = re.search(r"--(\w+)", message)
    field = named.group(1) if named else _option_with_value_in(argv, message)
    if field == "instance_data_dir":
        field = "photos"
    elif field in ("instance_prompt", "train_trigger_embedding"):
        field = "trigger"
    elif field == "class_prompt":
        field = "class_word"
    return {field: message}


def preset_table(argv: list[str]) -> list[dict]:
    """The memory plan's presets for this form's model and options, each with its peak (whole images, and the VAE
    in tiles) and ✓/✗ per card size, as `plan` prints them (trainer/memory_plan.py)."""
    args = validate_args(build_parser(PROG).parse_args(argv), needs_data=False)
    configs = model_configs(args.pretrained_model_name_or_path, args.model_config)
    table = []
    for name, settings in presets(plan_settings(args)).items():
        plan = plan_memory(configs, settings)
        table.append({"name": name, "options": PRESET_OPTIONS[name], "peak_gib": round(plan.peak / GIB, 2),
                      "tiled_peak_gib": round(plan.least / GIB, 2),
                      "fits": {str(gb): plan.fits(gb) for gb in CARD_SIZES_GB}})
    return table


def _option_with_value_in(argv: list[str], message: str) -> str:
    """The option whose value a message quotes ("model folder not found: /x" is about the option given /x), the
    longest value first; "form" when none."""
    pairs = [(argv[i][2:], argv[i + 1]) for i in range(len(argv) - 1)
             if argv[i].startswith("--") and not argv[i + 1].startswith("--")]
    pairs += [tuple(word[2:].split("=", 1)) for word in argv if word.startswith("--") and "=" in word]
    pairs = [(name, value) for name, value in pairs if len(value) > 2]
    quoted = [(len(value), name) for name, value in pairs if value in message]
    return max(quoted)[1] if quoted else "form"
