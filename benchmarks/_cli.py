"""What every benchmark's command line checks before it measures anything.

A bad argument must cost the user a one-line error and exit code 2 (argparse's), not a traceback
minutes into a run: a negative budget or batch size, or an output path that cannot be written,
is known before the first model is built. The ``type=`` helpers below make argparse reject bad
numbers; :func:`output_problem` says why an output path cannot be written (``parser.error`` it),
:func:`timm_model_problem` why a model name is not one, :func:`repeated_problem` why a list repeats a
value, and :func:`read_json` reads an input file (a ``parser.error`` where it cannot).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["HelpFormatter", "finite_float_at_least", "non_negative_float", "non_negative_int", "output_problem",
           "positive_float", "positive_int", "read_json", "repeated_problem", "run_main", "timm_model_problem",
           "whole_or_not_at_all"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: appended to its help unless the help states it itself
    (argparse's own formatter appended a second one, or none where an option had no help text), a flag's
    as off / on, a missing value's as none; a required option says so instead (it has no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)".lstrip()
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


def finite_float_at_least(minimum: float) -> Callable[[str], float]:
    """A ``type=`` for a finite number >= ``minimum`` (a budget below which a run cannot do its work)."""

    def finite_float(text: str) -> float:
        return _number(float, text, lambda v: minimum <= v < float("inf"), f"a finite number >= {minimum:g}")

    return finite_float


def repeated_problem(flag: str, values) -> str | None:
    """Why ``values`` of ``flag`` are not distinct (None when they are): a batch size given twice was
    measured twice (or its per-batch value silently replaced), which no one asks for on purpose."""
    seen, twice = set(), []
    for v in values:
        if v in seen and v not in twice:
            twice.append(v)
        seen.add(v)
    if not twice:
        return None
    return f"{flag} repeats {', '.join(map(str, twice))}: give each value once"


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


def read_json(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike):
    """The JSON document in ``path``, read before the run: a missing or unreadable file, or one that is
    not JSON, is ``parser.error`` naming ``flag`` (exit 2), not a traceback after the work."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        parser.error(f"{flag} {path}: {e.strerror or e}")
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError: one line each
        parser.error(f"{flag} {path}: not a JSON file ({e})")


def timm_model_problem(name: str) -> str | None:
    """Why timm cannot build the model ``name`` (None when it can): known at parse time, where
    ``timm.create_model`` failed only after the run had started."""
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    return f"{name!r} is not a timm model name" + (f" (did you mean {', '.join(close)}?)" if close else "")


@contextlib.contextmanager
def whole_or_not_at_all() -> Iterator[None]:
    """Ctrl-C waits for the block to end: a record (a JSON line, its CSV rows, a table) is written whole
    or not at all, never as a half line that the next reader of the history chokes on. The interrupt
    is raised as the block ends, as it would have been."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here


def run_main(main: Callable[[], int | None]) -> int:
    """A tool's ``main()``, with Ctrl-C as a one-line exit (code 130, as the shell reports a SIGINT)
    instead of a traceback: what was written before the interrupt is whole (:func:`whole_or_not_at_all`)."""
    try:
        code = main()
        return code if isinstance(code, int) else 0  # some mains return their record
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing more is written; what was written before it is complete",
              file=sys.stderr, flush=True)
        return 130
