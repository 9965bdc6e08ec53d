"""Every ``MIRA_*`` environment variable the package reads at run time, in one place.

``MIRA_BACKEND``       force a backend (``reference``, ``cpu``, ``triton``, ``cuda``) for every op
                       call; read at call time in eager and at trace time under ``torch.compile``.
``MIRA_CHECK_FINITE``  ``1`` makes every op call check its inputs for inf/NaN (a data scan, so
                       opt-in, for debugging; it synchronises with the device).
``MIRA_CPU_ISA``       instruction-set variant of the C++ CPU kernel: ``auto`` (default: the best the
                       CPU supports), ``baseline``, ``avx2`` or ``avx512``; read by the kernel itself
                       (csrc/cpu/mira_linear_cpu.cpp, ``active_table``) at every call, so tests can
                       switch it; ``torch.ops.mira._cpu_isa_info()`` returns [active, supported...].
``MIRA_CPU_STREAM``    store choice of the C++ CPU kernel's seeding passes (the output written before
                       the beta = 1 GEMM): ``auto`` (default: streaming stores when the output exceeds
                       the threads' L2 caches and 2 MiB and its pages are resident), ``0`` (ordinary stores) or
                       ``1`` (streaming); the values are the same bits either way. Read by the kernel
                       at every call; ``torch.ops.mira._cpu_streams_into(out)`` gives the choice.

Build-time switches (``MIRA_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST``) are read by ``setup.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

_TRUE = {"1", "true", "yes", "on"}

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("mira_backend", default=None)
_check_finite: contextvars.ContextVar[bool | None] = contextvars.ContextVar("mira_check_finite", default=None)

# Both variables are read on every op call, and usually unset. os.environ.get of an unset name
# raises and catches a KeyError inside: ~13 us per read when the call follows a large GEMM that
# has evicted the interpreter's caches (measured), against ~1 us for a membership test on the
# dict under os.environ, which every os.environ write updates.
try:
    _ENVIRON, _encode_key = os.environ._data, os.environ.encodekey
except AttributeError:  # not CPython's os._Environ: the plain mapping
    _ENVIRON, _encode_key = os.environ, str
_BACKEND_KEY, _CHECK_FINITE_KEY = _encode_key("MIRA_BACKEND"), _encode_key("MIRA_CHECK_FINITE")


def _getenv(name: str, key) -> str:
    return os.environ.get(name, "").strip().lower() if key in _ENVIRON else ""


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or else ``MIRA_BACKEND``."""
    forced = _forced_backend.get()
    if forced is not None:
        return forced
    return _getenv("MIRA_BACKEND", _BACKEND_KEY) or None


def check_finite_enabled() -> bool:
    flag = _check_finite.get()
    if flag is not None:
        return flag
    return _getenv("MIRA_CHECK_FINITE", _CHECK_FINITE_KEY) in _TRUE


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force the backend of every MIRA op called inside the block (``None`` restores the default).

    The name is checked when an op runs, against the tensors' device, so the same block can
    force ``reference`` for a CPU and a CUDA model alike. Thread- and task-local.
    """
    token = _forced_backend.set(None if name is None else name.strip().lower())
    try:
        yield
    finally:
        _forced_backend.reset(token)


@contextlib.contextmanager
def check_finite(enabled: bool = True):
    """Check every op's floating inputs for inf/NaN inside the block (debugging aid)."""
    token = _check_finite.set(enabled)
    try:
        yield
    finally:
        _check_finite.reset(token)
