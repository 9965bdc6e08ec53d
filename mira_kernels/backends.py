"""Backend routing: the one mechanism that decides which implementation runs a MIRA op.

Four backends implement the same contract (``docs/contract.md``):

``reference``  plain PyTorch (:mod:`mira_kernels.reference`), any device; the specification.
``cpu``        the C++ CPU kernel in ``csrc/cpu/`` (needs the built extension).
``triton``     the Triton kernels in :mod:`mira_kernels.triton`, CUDA tensors.
``cuda``       the CUDA C++ kernels in ``csrc/cuda/`` (needs the extension built with CUDA).

Exactly one kernel is registered per dispatch key for each public op (``csrc/mira_ops.cpp``; the
Python part of the routing is in :mod:`mira_kernels.ops`); it routes to a backend by name. The
public functions resolve that name *before* entering the op, so it is read at call time in eager
and at trace time under ``torch.compile``:

1. the innermost :func:`use_backend` block, else the ``MIRA_BACKEND`` environment variable;
   a forced backend that cannot run on the tensors' device raises ``RuntimeError``, except on
   meta tensors, which run the fake kernels whatever is forced (the name is ``reference``);
2. otherwise the default for the device and x's dtype: CPU -> ``cpu`` if built, else
   ``reference``; CUDA -> ``triton``, else ``cuda``, else ``reference``, except float32 x, which
   tries ``cuda`` first (see :data:`_CUDA_FLOAT32_ORDER`). Falling back to ``reference`` because
   a native part is missing warns once.

A backend implementation is any object with three callables whose positional arguments are
the op schema's (``csrc/mira_ops.cpp``) minus the trailing ``backend``::

    mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps) -> y
    mira_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets,
                         separation, scale, eps, output_mask) -> (dx, dquery, dkeys, dbank_a, dbank_b)
    mira_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps) -> None

The backward may return None for a gradient ``output_mask`` does not ask for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import _config, _extension, reference

__all__ = ["BACKENDS", "available_backends", "use_backend", "resolve_backend", "implementation"]

BACKENDS = _config.BACKEND_NAMES

# Meta tensors (shape inference) run the ops' fake kernels whatever the name; "reference" says so.
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference"), "meta": ("reference",)}
#: float32 x on CUDA: the CUDA C++ backend first. Measured on an H200 (benchmarks/results/gpu, runs at
#: bd60c98 and 9c67b4a; ViT-B/16 forward in a CUDA graph, ratio over stock): cuda 1.26 / 1.10 / 1.05 /
#: 1.05 at B = 1 / 8 / 64 / 256 against triton 2.04 / 1.89 / 1.73 / 1.82 (cuBLAS's fp32 GEMM plus its
#: adapter pass beats Triton's IEEE-fp32 GEMM), and it meets the 2x / 3x criteria near the affine
#: guard (tests/test_cuda_gpu.py::test_vit_b_batch_64_negative_float32). 16-bit x keeps triton first
#: (bf16: 1.62 / 1.39 / 1.16 / 1.25 against cuda's 2.24 / 1.85 / 1.50 / 1.42).
_CUDA_FLOAT32_ORDER = ("cuda", "triton", "reference")

use_backend = _config.use_backend


@dataclass(frozen=True)
class _Backend:
    device_types: tuple[str, ...]
    # Returns None when the backend can run on that device (a torch.device: the index matters
    # on machines whose GPUs differ), else the reason it cannot.
    unavailable_reason: Callable[[torch.device], str | None]
    load: Callable[[], object]


def _reference_impl() -> object:
    def linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
        return reference.mira_linear(
            x, weight, bias, query, keys, bank_a, bank_b,
            slice_offsets=slice_offsets, separation=separation, scale=scale, eps=eps,
        )

    def linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps,
                        output_mask):
        return reference.mira_linear_backward(
            grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets=slice_offsets,
            separation=separation, scale=scale, eps=eps, output_mask=output_mask,
        )

    def adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
        reference.mira_adapter_(
            out, x, query, keys, bank_a, bank_b,
            slice_offsets=slice_offsets, separation=separation, scale=scale, eps=eps,
        )

    return SimpleNamespace(mira_linear=linear, mira_linear_backward=linear_backward, mira_adapter_=adapter_)


def _native_impl(prefix: str) -> Callable[[], object]:
    # The C++ backends are private ops (``mira::_cpu_mira_linear`` ...) whose schemas equal the
    # backend interface, so the ops themselves are the implementation.
    def load():
        ops = torch.ops.mira
        return SimpleNamespace(
            mira_linear=getattr(ops, f"{prefix}mira_linear"),
            mira_linear_backward=getattr(ops, f"{prefix}mira_linear_backward"),
            mira_adapter_=getattr(ops, f"{prefix}mira_adapter_"),
        )

    return load


def _native_reason(op: str, dispatch_key: str, what: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if not _extension.has_kernel(op, dispatch_key):
            return f"the extension mira_kernels._C was built without {what}" + _extension.load_error_suffix()
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    return reason


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    # Read once per device: routing asks on every eager call.
    return tuple(torch.cuda.get_device_capability(index))


def _cuda_reason(device: torch.device) -> str | None:
    reason = _native_reason("_cuda_mira_linear", "CUDA", "CUDA")(device)
    if reason is not None:
        return reason
    # The tensor's own device decides (machines can mix GPU generations): its capability must reach the
    # oldest architecture the build carries code for (newer ones run the embedded PTX). The op itself
    # checks again, exactly, by asking the runtime for a kernel image on that device.
    archs = _extension.cuda_archs()
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if archs and 100 * major + 10 * minor < min(archs):
        oldest = min(archs)
        return (f"the cuda backend was built for compute capability >= {oldest // 100}.{oldest % 100 // 10} "
                f"(TORCH_CUDA_ARCH_LIST at build time), cuda:{index} has {major}.{minor}")
    return None


def _reference_reason(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


@functools.cache
def _triton_installed() -> bool:
    # Resolution runs on every eager op call; without triton, find_spec would scan sys.path each time.
    return importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if device.type == "cpu":
        # The interpreter runs the kernels on CPU tensors, one program at a time: how they are tested
        # without a GPU (tests/fuzz/triton_interp.py forces this backend through the public API).
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "it runs on cuda tensors (on cpu tensors only under the Triton interpreter, TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    # The rest of mira_kernels.triton.unavailable_reason: triton is installed (above) and importing
    # mira_kernels.triton imports it only when a kernel runs.
    module = sys.modules.get("mira_kernels.triton") or importlib.import_module("mira_kernels.triton")
    return module._capability_reason(device)


def _triton_load() -> object:
    return importlib.import_module("mira_kernels.triton")


_REGISTRY: dict[str, _Backend] = {
    "reference": _Backend(("cpu", "cuda", "meta"), _reference_reason, _reference_impl),
    "cpu": _Backend(("cpu",), _native_reason("_cpu_mira_linear", "CPU", "its CPU kernel"), _native_impl("_cpu_")),
    "triton": _Backend(("cuda", "cpu"), _triton_reason, _triton_load),
    "cuda": _Backend(("cuda",), _cuda_reason, _native_impl("_cuda_")),
}

_loaded: dict[str, object] = {}
_warned_fallback: set[str] = set()


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _reason(name: str, device: torch.device) -> str | None:
    backend = _REGISTRY[name]
    if device.type not in backend.device_types:
        return f"it runs on {' / '.join(backend.device_types)} tensors, not {device.type}"
    return backend.unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run MIRA ops on tensors of ``device`` on this machine."""
    device = _device(device)
    return [name for name in BACKENDS if _reason(name, device) is None]


# Under torch.compile the choice is made once, when the call is traced, and baked into the graph:
# changing MIRA_BACKEND or use_backend afterwards does not recompile (call torch._dynamo.reset()).
@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend a MIRA op on ``device`` with x of ``dtype`` runs with now (see the module docstring;
    ``dtype`` only changes the default order)."""
    device = _device(device)
    device_type = device.type
    forced = _config.requested_backend()
    if forced is not None:
        if forced not in _REGISTRY:
            raise ValueError(
                f"unknown MIRA backend {forced!r} (from use_backend or MIRA_BACKEND); expected one of {BACKENDS}"
            )
        # Meta tensors run the ops' fake kernels (shape inference), not a backend: what is forced for
        # the real tensors of the same code ("cpu" refused them, as it cannot run on meta) does not matter.
        if device_type == "meta":
            return "reference"
        reason = _reason(forced, device)
        if reason is not None:
            raise RuntimeError(
                f"MIRA backend {forced!r} was requested for {device_type} tensors but cannot run: {reason}"
            )
        return forced
    if device_type == "cuda" and dtype == torch.float32:
        order = _CUDA_FLOAT32_ORDER
    else:
        order = _DEFAULT_ORDER.get(device_type, ("reference",))
    skipped = []
    for name in order:
        reason = _reason(name, device)
        if reason is None:
            if skipped and name == "reference" and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                details = "; ".join(f"{n}: {r}" for n, r in skipped)
                warnings.warn(
                    f"mira_kernels: no native backend for {device_type} tensors ({details}); "
                    "falling back to the plain-PyTorch reference, which is correct but slow.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return name
        skipped.append((name, reason))
    raise RuntimeError(f"no MIRA backend can run on {device_type} tensors")


def fused_helpers_available(device: torch.device | str) -> bool:
    """Whether the layers may run MIRA's auxiliary Triton kernels (``mira_kernels.triton.normalize_columns``)
    on ``device``: a CUDA device the Triton backend can run on, and no other backend requested
    (``use_backend("reference")`` or ``"cuda"`` keeps the layers on ATen ops too)."""
    device = _device(device)
    if device.type != "cuda" or _config.requested_backend() not in (None, "triton"):
        return False
    return _reason("triton", device) is None


def implementation(name: str) -> object:
    """The implementation object of backend ``name`` (loaded on first use)."""
    impl = _loaded.get(name)
    if impl is None:
        if name not in _REGISTRY:
            raise ValueError(f"unknown MIRA backend {name!r}; expected one of {BACKENDS}")
        impl = _loaded[name] = _REGISTRY[name].load()
    return impl
