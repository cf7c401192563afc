"""What the command lines (`fedprune`, `fedprune-edge`) share in parsing: argument types that
refuse a bad value with argparse's own usage error (rc 2, naming the flag) rather than a
validation dump later, and `--help` that says the defaults."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of rounds, devices, samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (an epsilon, a deadline in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, or 0 for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (a free port) to 65535, got {value}")
    return value


def data_dir_problem(text: str) -> str | None:
    """Why `text` cannot be a dataset folder someone named, or None. A named folder must exist:
    the loader would otherwise download into whatever a typo says (its library call still may,
    for a folder created on purpose), so downloading into a new folder takes a mkdir first."""
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{text} is a file, not a folder of dataset files"
    return (f"folder {text} does not exist; check the path, or create it (mkdir -p "
            f"{shlex.quote(text)}) to download the dataset into it")


def data_dir(text: str) -> str:
    """An argparse type: a dataset folder that exists (see `data_dir_problem`), made absolute: the
    demo writes it into each device's edge.toml, whose relative paths are read from its folder."""
    problem = data_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return str(Path(text).expanduser().resolve())


class DefaultsHelp(argparse.HelpFormatter):
    """`--help` says each option's default, where it has one worth saying (not None or off) and
    its text does not speak of it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def with_defaults_help(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every subcommand under it the DefaultsHelp formatter."""
    parser.formatter_class = DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                with_defaults_help(child)

