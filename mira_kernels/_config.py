"""Every ``MIRA_*`` environment variable, in one place, with one parser and one rule.

The rule: a value is read with surrounding whitespace stripped; choices are case-insensitive;
an unset or empty variable means its default; the switches that mean on/off accept ``1``,
``true``, ``yes``, ``on`` and ``0``, ``false``, ``no``, ``off``; anything else is a ``ValueError``
that names the variable, the value and the allowed values, raised wherever the variable is read
(on every call that reads it, whatever path the call takes).

``MIRA_BACKEND``       force a backend (``reference``, ``cpu``, ``triton``, ``cuda``) for every op
                       call; read at call time in eager and at trace time under ``torch.compile``.
                       Unset: the default for the tensors' device (``mira_kernels.backends``).
``MIRA_CHECK_FINITE``  on/off, default off: every op call checks its inputs for inf/NaN (a data
                       scan, so opt-in, for debugging; it synchronises with the device). Read as
                       ``MIRA_BACKEND``: at call time in eager, at trace time under ``torch.compile``.
``MIRA_CPU_ISA``       instruction-set variant of the C++ CPU kernel: ``auto`` (default: the best the
                       CPU supports), ``baseline``, ``avx2`` or ``avx512``. Read by the kernel itself
                       at every call (``csrc/env.h``, the same rule in C++), so tests can switch it;
                       ``torch.ops.mira._cpu_isa_info()`` returns [active, supported...].
``MIRA_CPU_STREAM``    store choice of the C++ CPU kernel's seeding passes (the output written before
                       the beta = 1 GEMM): ``auto`` (default: streaming stores when the output exceeds
                       the threads' L2 caches, 2 MiB and a quarter of the last-level cache, and its
                       pages are resident), off (ordinary stores) or on (streaming); the values are
                       the same bits either way. Read by the kernel at every call (``csrc/env.h``);
                       ``torch.ops.mira._cpu_streams_into(out)`` gives the choice,
                       ``torch.ops.mira._cpu_stream_threshold_bytes()`` the size rule.
``MIRA_BUILD_CUDA``    build time (``setup.py``): ``auto`` (default), on (require the CUDA part) or
                       off (skip it).
``MIRA_SANITIZE``      build time (``setup.py``): on builds the C++ CPU kernel with AddressSanitizer and
                       UndefinedBehaviorSanitizer (``make sanitize``; default off).
``MIRA_EXPERIMENTS_CACHE``  a directory (``mira.experiments``): where backbone features are cached;
                       default ``~/.cache/mira-kernels``. A path: whitespace is stripped, case kept.

The C++ kernel reads its two variables through ``csrc/env.h``, which implements this rule;
``tests/test_config_env.py`` checks both against one table of values.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch

#: Backend names (mira_kernels.backends documents them).
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_SWITCH_NOTE = "1/true/yes/on or 0/false/no/off"
# ASCII whitespace only: what C's isspace strips in csrc/env.h, so both read a value alike.
_WHITESPACE = " \t\n\r\x0b\x0c"


@dataclass(frozen=True)
class Variable:
    """One environment variable. ``choices`` None: a free value (a path); else the canonical
    values, where ``"1"`` / ``"0"`` stand for on / off and take every spelling of the rule."""

    name: str
    default: str
    choices: tuple[str, ...] | None

    def parse(self, raw: str | None) -> str:
        value = (raw or "").strip(_WHITESPACE)
        if not value:
            return self.default
        if self.choices is None:
            return value
        key = value.lower()
        if "1" in self.choices and key in _ON:
            return "1"
        if "0" in self.choices and key in _OFF:
            return "0"
        if key in self.choices:
            return key
        raise ValueError(f"{self.name}={raw!r} is not valid; expected {self.allowed()} (case and surrounding "
                         "whitespace are ignored)")

    def allowed(self) -> str:
        parts = [c for c in self.choices if c not in ("1", "0")]
        if "1" in self.choices:
            parts.append(f"on or off ({_SWITCH_NOTE})")
        return ", ".join(parts) + (", or unset" if self.default == "" else "")


VARIABLES = {
    v.name: v
    for v in (
        Variable("MIRA_BACKEND", "", BACKEND_NAMES),
        Variable("MIRA_CHECK_FINITE", "0", ("1", "0")),
        Variable("MIRA_CPU_ISA", "auto", ("auto", "baseline", "avx2", "avx512")),
        Variable("MIRA_CPU_STREAM", "auto", ("auto", "1", "0")),
        Variable("MIRA_BUILD_CUDA", "auto", ("auto", "1", "0")),
        Variable("MIRA_SANITIZE", "0", ("1", "0")),
        Variable("MIRA_EXPERIMENTS_CACHE", "", None),
    )
}

# MIRA_BACKEND and MIRA_CHECK_FINITE are read on every op call, and usually unset. os.environ.get
# of an unset name raises and catches a KeyError inside: ~13 us per read when the call follows a
# large GEMM that has evicted the interpreter's caches (measured), against ~1 us for a membership
# test on the dict under os.environ, which every os.environ write updates.
try:
    _ENVIRON, _encode_key = os.environ._data, os.environ.encodekey
except AttributeError:  # not CPython's os._Environ: the plain mapping
    _ENVIRON, _encode_key = os.environ, str
_KEYS = {name: _encode_key(name) for name in VARIABLES}


def read(name: str) -> str:
    """The parsed value of the ``MIRA_*`` variable ``name`` (its default when unset or empty)."""
    variable = VARIABLES[name]
    if _KEYS[name] not in _ENVIRON:
        return variable.default
    return variable.parse(os.environ.get(name))


def enabled(name: str) -> bool:
    """An on/off variable's value."""
    return read(name) == "1"


_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("mira_backend", default=None)
_check_finite: contextvars.ContextVar[bool | None] = contextvars.ContextVar("mira_check_finite", default=None)


def backend_name(name) -> str:
    """A backend name as the rule reads it (stripped, lower case); TypeError / ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a MIRA backend name must be a str (one of {BACKEND_NAMES}) or None, got "
                        f"{type(name).__name__} {name!r}")
    key = name.strip(_WHITESPACE).lower()  # the environment's rule (ASCII whitespace), so both read a name alike
    if key not in BACKEND_NAMES:
        raise ValueError(f"unknown MIRA backend {name!r}; expected one of {BACKEND_NAMES}")
    return key


# Under torch.compile the two settings every op reads are taken once, when the call is traced, and
# baked into the graph, like the backend choice (backends.resolve_backend): Dynamo calls these
# functions instead of tracing them. Traced, their ContextVar.get broke fullgraph compiles on torch
# 2.11, whose Dynamo has no support for it (2.14 traces it with a guard); assume_constant_result
# exists in both, and gives one behaviour on every version: changing use_backend / check_finite /
# the variables after a compile does not recompile (torch._dynamo.reset() does).
@torch.compiler.assume_constant_result
def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or else ``MIRA_BACKEND``."""
    forced = _forced_backend.get()
    if forced is not None:
        return forced
    return read("MIRA_BACKEND") or None


@torch.compiler.assume_constant_result
def check_finite_enabled() -> bool:
    """Whether :func:`check_finite` (innermost wins) or else ``MIRA_CHECK_FINITE`` asks for the scan."""
    flag = _check_finite.get()
    if flag is not None:
        return flag
    return enabled("MIRA_CHECK_FINITE")


def call_time_reads() -> tuple[tuple[contextvars.ContextVar, ...], dict | None, tuple]:
    """What :func:`requested_backend` and :func:`check_finite_enabled` read, for a prepared call
    that checks them itself (``mira_kernels.ops.eval_plan``): the defaults hold when both context
    variables are None and the environment's dict holds neither key. The dict is None where
    ``os.environ`` is not CPython's (then nothing may be prepared)."""
    environ = _ENVIRON if type(_ENVIRON) is dict else None
    return (_forced_backend, _check_finite), environ, (_KEYS["MIRA_BACKEND"], _KEYS["MIRA_CHECK_FINITE"])


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force the backend of every MIRA op called inside the block (``None`` restores the default).

    The name is one of :data:`BACKEND_NAMES` (case and surrounding whitespace ignored); a bad
    name fails here. Whether the backend can run is checked when an op runs, against the
    tensors' device, so the same block can force ``reference`` for a CPU and a CUDA model alike.
    Thread- and task-local.
    """
    token = _forced_backend.set(None if name is None else backend_name(name))
    try:
        yield
    finally:
        _forced_backend.reset(token)


@contextlib.contextmanager
def check_finite(enabled: bool = True):
    """Check every op's floating inputs for inf/NaN inside the block (debugging aid)."""
    if not isinstance(enabled, bool):  # bool("false") is True
        raise TypeError(f"check_finite takes True or False, got {enabled!r}")
    token = _check_finite.set(enabled)
    try:
        yield
    finally:
        _check_finite.reset(token)
