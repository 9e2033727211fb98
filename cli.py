"""The command-line conventions every front end shares (train.py, train_mitigations.py, run_experiment.py,
analyze_credit.py, the benches): long options in either spelling, and config overrides in either form.

- `--log_path` and `--log-path` are the same option: a multi-word flag is declared in one spelling and the
  other is accepted too (the config keys are snake_case, many command lines are kebab-case).
- A config override is a `section.key=value` word, or the same after `--set`, in every script that takes
  overrides: `train.py training.max_steps=5` = `train.py --set training.max_steps=5`.

argparse only; nothing of the project is imported (analyze_credit.py runs without torch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _canonical(flag: str) -> str:
    return flag.replace("-", "_")


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose long options also answer to their other spelling (`_` <-> `-`)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.normalize(args), namespace)

    def error(self, message: str):
        """One line, as every other bad input: the usage is in --help."""
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")

    def normalize(self, args: list[str]) -> list[str]:
        """Each `--other_spelling[=value]` rewritten to the declared spelling; words after `--` untouched."""
        declared = {_canonical(s): s for s in self._option_string_actions if s.startswith("--") and len(s) > 2}
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and flag not in self._option_string_actions:
                flag = declared.get(_canonical(flag), flag)
            out.append(flag + eq + value)
        return out


def add_overrides(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """`section.key=value` words (when `positional`) and `--set section.key=value`; `overrides(args)` joins them."""
    if positional:
        parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                            help="config overrides (the same as --set section.key=value)")
    parser.add_argument("--set", action="append", default=[], dest="set_overrides", metavar="section.key=value",
                        help="a config override (repeatable)" + (", the same as a bare section.key=value word"
                                                                 if positional else ""))


def overrides(args: argparse.Namespace) -> list[str]:
    """The positional overrides, then the --set ones (a key given twice: the later wins)."""
    return [*getattr(args, "overrides", []), *args.set_overrides]
