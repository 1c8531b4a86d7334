"""The command line's parser: no abbreviated options, and errors of one short line instead of the whole usage."""

from __future__ import annotations

import argparse
import difflib
import re


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
"""What argparse must read as a value, not an option: its own pattern misses exponents, so `--learning_rate -1e-3`
failed with "expected one argument" instead of the option's own check."""


class CommandParser(argparse.ArgumentParser):
    """`--learning_rat 1e-3` is an error, not a silent `--learning_rate`; an unknown flag names the closest one;
    every negative number is a value."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own attribute, read when it splits argv

    def _option_names(self) -> list[str]:
        names = []
        for action in self._actions:
            names += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names += [o for a in sub._actions for o in a.option_strings]
        return names

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [word for word in unknown.group(1).split() if word.startswith("-")] or [unknown.group(1)]
            closest = difflib.get_close_matches(flags[0].split("=")[0], self._option_names(), n=1)
            message = f"unrecognized argument {flags[0]}" + (f"; did you mean {closest[0]}?" if closest else "")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
