"""No silent abbreviations; an unknown flag's error is one short line naming the closest real flag."""

import pytest

from dreambooth_moslora.trainer.arguments import build_parser
from dreambooth_moslora.verbs.cli import build_parser as build_cli_parser


def test_an_abbreviated_flag_is_refused_with_the_flag_it_resembles(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("train").parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                          "--instance_prompt", "p", "--learning_rat", "1e-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unrecognized argument --learning_rat; did you mean --learning_rate? (see train --help)"]


def test_a_verb_option_typo_names_the_verb_option(capsys):
    with pytest.raises(SystemExit):
        build_cli_parser().parse_args(["inspect", "x", "--jsn"])
    assert "did you mean --json?" in capsys.readouterr().err


def test_other_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["--rank", "four"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


@pytest.mark.parametrize("value, expected", [("-1e-3", -0.001), ("-2E+2", -200.0), ("-.5", -0.5), ("-3", -3.0)])
def test_a_negative_number_is_a_value_exponent_and_all(value, expected):
    """argparse's own pattern misses exponents: `--learning_rate -1e-3` was "expected one argument"."""
    args = build_parser("train").parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                             "--instance_prompt", "p", "--learning_rate", value])
    assert args.learning_rate == expected


def test_a_word_after_a_dash_is_still_an_option(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["--learning_rate", "-e3"])
    assert "expected one argument" in capsys.readouterr().err
