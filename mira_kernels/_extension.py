"""Loads the native extension ``mira_kernels._C``: soft at import, loud at call.

Importing ``_C`` registers the op schemas (``csrc/mira_ops.cpp``) and whichever backend
kernels were compiled in. If it is missing or fails to load, the package still imports and the
public functions fall back to the reference (with a one-time warning from the router).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import _sources

try:
    from . import _C  # noqa: F401  (registers the ops as a side effect)

    load_error: str | None = None
except ImportError as exc:  # not built, or built against another torch
    load_error = f"{type(exc).__name__}: {exc}"

loaded = load_error is None

#: Why the loaded library does not match this source checkout's sources, or None (see _sources).
stale: str | None = None
if loaded:
    stale = _sources.stale_note(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                os.path.dirname(os.path.abspath(_C.__file__)))
    if stale is not None:
        warnings.warn(stale, RuntimeWarning, stacklevel=2)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``mira::<op>`` has a kernel for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    return loaded and _registered(op, dispatch_key)


# Registrations happen when _C loads and never change afterwards; the router asks on every op call.
@functools.cache
def _registered(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mira::{op}", dispatch_key)


def load_error_suffix() -> str:
    return "" if loaded else f" (it did not load: {load_error}; build it with `make build`)"


@functools.cache
def cuda_archs() -> tuple[int, ...]:
    """Virtual GPU architectures the CUDA part was compiled for (e.g. ``(800, 900)``); empty without it."""
    if not loaded or not hasattr(torch.ops.mira, "_cuda_arch_list"):
        return ()
    return tuple(int(a) for a in torch.ops.mira._cuda_arch_list())


def build_info() -> dict[str, object]:
    """What this installation was built with, and what loaded."""
    return {
        "extension_loaded": loaded,
        "load_error": load_error,
        "stale_sources": stale,
        "cpu_kernel": has_kernel("_cpu_mira_linear", "CPU"),
        "cuda_kernel": has_kernel("_cuda_mira_linear", "CUDA"),
        "cuda_archs": cuda_archs(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
