"""What every benchmark's command line checks before it measures anything.

A bad argument must cost the user a one-line error and exit code 2 (argparse's), not a traceback
minutes into a run: a negative budget or batch size, or an output path that cannot be written,
is known before the first model is built. The ``type=`` helpers below make argparse reject bad
numbers; :func:`output_problem` says why an output path cannot be written (``parser.error`` it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

__all__ = ["HelpFormatter", "non_negative_float", "non_negative_int", "output_problem", "positive_float",
           "positive_int"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: appended to its help unless the help states it itself
    (argparse's own formatter appended a second one, or none where an option had no help text), a flag's
    as off / on, a missing value's as none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # store_true / store_false
            shown = "on" if action.default else "off"
        elif action.default is None or action.default == "":
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})".lstrip()


def _number(kind, text: str, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(value):  # NaN and inf fail every comparison below (a budget of inf never ends)
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: 0 < v < float("inf"), "a positive finite number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def output_problem(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` cannot take a benchmark's output (None when it can), checked without leaving
    anything behind: ``folder=True`` for a folder the run creates or writes into, else a file
    (its folder must exist). Checked by writing a scratch file there, which also catches a
    read-only file system and permissions that ``os.access`` reports wrongly for root."""
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            return f"{p} exists and is not a folder"
        probe = p
        while not probe.exists():  # the run creates the missing part: its nearest existing parent must be writable
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a folder, so {p} cannot be created"
    else:
        if p.is_dir():
            return f"{p} is a folder, not a file"
        probe = p.parent
        if not probe.is_dir():
            return f"the folder of {p} does not exist"
        if p.exists() and not os.access(p, os.W_OK):
            return f"{p} is not writable"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"cannot write into {probe}: {e.strerror or e}"
    return None
