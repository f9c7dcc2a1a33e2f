"""What every ``graphmoe-fused`` subcommand shares: one-line argument errors (exit status 2),
value parsers that name the problem, and one-line run errors (exit status 1)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from safetensors import SafetensorError

USAGE_ERROR = 2  # argparse's status for a bad command line
RUN_ERROR = 1  # the library refused something during the run
INTERRUPTED = 130
# What the library raises for input it refuses (a bad file, a model it cannot convert, an output
# directory that exists, a truncated .safetensors file, CUDA out of memory): shown as one line.
# Anything else is a bug and keeps its traceback.
RUN_ERRORS = (ValueError, TypeError, RuntimeError, OSError, SafetensorError)


class FlagError(ValueError):
    """A flag whose value, or combination with others, is refused after parsing (a range the
    settings check, a device this machine lacks): a bad command line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: no usage block above the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} "
                               f"(see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def non_empty_path(text: str) -> str:
    """A file or folder name; an empty one (an unset shell variable) is refused, not taken as
    "none given" or the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _int_at_least(text: str, minimum: int) -> int:
    value = integer(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= {minimum}")
    return value


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def int_at_least_two(text: str) -> int:
    """An integer >= 2 (``--cutoff-len``: a token and the one predicted from it)."""
    return _int_at_least(text, 2)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def run_guarded(prog: str, job: Callable[[], int], debug: bool = False) -> int:
    """Runs ``job``; a refused flag (:class:`FlagError`) is one line on stderr and exit status
    2, as argparse's own errors; a refused input (:data:`RUN_ERRORS`) one line and 1 (``debug``
    re-raises either instead); Ctrl-C is one line and 130."""
    try:
        return job()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except FlagError as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(str(exc))} (see {prog} --help)", file=sys.stderr)
        return USAGE_ERROR
    except RUN_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {one_line(str(exc)) or '(no message)'} "
              "(--debug shows the traceback)", file=sys.stderr)
        return RUN_ERROR
