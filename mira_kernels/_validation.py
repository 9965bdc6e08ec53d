"""Argument checks of the MIRA ops, on metadata only.

Nothing here reads tensor data, so the checks cost nothing on the device, never synchronise,
and trace cleanly under ``torch.compile`` (shapes may be symbolic). Errors name the argument
and the shape or dtype that was expected. The opt-in finiteness check is the one exception and
lives in :func:`check_finite`.

The same conditions are checked in C++ by the op kernels (``csrc/validation.cpp``), which are
the only checks of an eager call (``ops.py`` says why); this module words the documented errors
(the public functions call it once the op has rejected an argument) and checks traced calls. A
condition added here must be added there: ``tests/test_validation.py`` runs every bad input
through both.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from .reference import SEPARATIONS

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
#: Storage dtypes of bank_a / bank_b with float32 compute (x float32, float16 or bfloat16).
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {_shape(t)}")


# Shapes are read once per tensor and passed around: the checks run on every op call, often with
# cold caches right after a large GEMM, where each extra Python attribute lookup costs.
def _check_dim(name: str, shape: tuple, dim: int, expected, what: str, layout: str) -> None:
    if shape[dim] != expected:
        raise ValueError(f"{name} must have shape {layout} with {what} = {expected}, got {tuple(shape)}")


def check_memory(
    x_dtype: torch.dtype,
    device: torch.device,
    d_in,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    batch,
    slice_offsets: Sequence[int],
    d_out,
    separation: str,
    scale: float,
    eps: float,
) -> None:
    """Checks of the memory side (query, keys, banks, slices, separation) shared by every op."""
    _check_rank("query", query, 2, "(B, d_k)")
    _check_rank("keys", keys, 2, "(N, d_k)")
    _check_rank("bank_a", bank_a, 4, "(N, S, r, d_in)")
    _check_rank("bank_b", bank_b, 4, "(N, S, d_s, r)")
    q_shape, a_shape, b_shape = query.shape, bank_a.shape, bank_b.shape
    n_slots, d_k = keys.shape
    n, s, r, _ = a_shape
    if r < 1 or s < 1:
        raise ValueError(f"bank_a must have S >= 1 slices and rank r >= 1, got shape {tuple(a_shape)}")
    _check_dim("query", q_shape, 0, batch, "B (the batch of x)", "(B, d_k)")
    _check_dim("query", q_shape, 1, d_k, "d_k (the width of keys)", "(B, d_k)")
    _check_dim("bank_a", a_shape, 0, n_slots, "N (the number of keys)", "(N, S, r, d_in)")
    _check_dim("bank_a", a_shape, 3, d_in, "d_in (the width of x)", "(N, S, r, d_in)")
    _check_dim("bank_b", b_shape, 0, n_slots, "N (the number of keys)", "(N, S, d_s, r)")
    _check_dim("bank_b", b_shape, 1, s, "S (as bank_a)", "(N, S, d_s, r)")
    _check_dim("bank_b", b_shape, 3, r, "r (the rank of bank_a)", "(N, S, d_s, r)")

    for name, t in (("query", query), ("keys", keys)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all inputs must share one device")
        if t.dtype != x_dtype and not (x_dtype in _HALF and t.dtype == torch.float32):
            allowed = f"{x_dtype} or torch.float32" if x_dtype in _HALF else str(x_dtype)
            raise TypeError(f"{name} has dtype {t.dtype}; with x of dtype {x_dtype} it must be {allowed}")
    # The banks (contract section 4): float32, bfloat16 or float16 wherever the compute dtype is
    # float32 (16-bit banks are widened exactly and mixed in float32), float64 for float64 x.
    for name, t in (("bank_a", bank_a), ("bank_b", bank_b)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all inputs must share one device")
        if x_dtype == torch.float64:
            if t.dtype != torch.float64:
                raise TypeError(f"{name} has dtype {t.dtype}; with x of dtype {x_dtype} it must be torch.float64 "
                                "(16-bit banks need float32 compute: x float32, bfloat16 or float16)")
        elif t.dtype not in BANK_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; with x of dtype {x_dtype} it must be torch.float32, "
                            "torch.bfloat16 or torch.float16")

    offsets = list(slice_offsets)
    if len(offsets) != s:
        raise ValueError(f"slice_offsets has {len(offsets)} entries but bank_a/bank_b have S = {s} slices")
    check_slice_offsets(offsets, b_shape[2], d_out)

    check_separation(separation)
    check_eps(eps)
    check_scale(scale)


# Scalars: real numbers only (int, float, numpy scalars, and the symbolic ints / floats of a
# torch.compile trace); a str, a bool, a tensor or None is a TypeError on every path. The
# comparisons below (no math.isfinite) also work on a torch.SymFloat, and NaN fails them.
_REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        try:  # the ops take float(value): an int beyond float's range is not a finite number
            float(value)
        except OverflowError:
            raise ValueError(f"{name} must be a finite number, got an int of {value.bit_length()} bits") from None


def check_separation(separation) -> None:
    if not isinstance(separation, str):  # bytes too: the traced path and the eager one must agree
        raise TypeError(f"separation must be a str, one of {SEPARATIONS}; got {type(separation).__name__} "
                        f"{separation!r}")
    if separation not in SEPARATIONS:
        raise ValueError(f"unknown separation {separation!r}; expected one of {SEPARATIONS}")


def check_eps(eps) -> None:
    check_real("eps", eps)
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_scale(scale) -> None:
    check_real("scale", scale)
    if not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _is_offsets_sequence(slice_offsets) -> bool:
    # Ordered and re-readable: a list, tuple, range, or a 1-D tensor or numpy array. Not a set or dict
    # (hash order; a dict's keys), nor an iterator (which the first look would consume), nor bytes (a
    # sequence of ints: b"\x00\x10" read as [0, 16]) or text.
    if isinstance(slice_offsets, (str, bytes, bytearray, memoryview)):
        return False
    return isinstance(slice_offsets, Sequence) or (
        getattr(slice_offsets, "ndim", None) == 1 and hasattr(slice_offsets, "__len__")
    )


def _is_bool(offset) -> bool:
    # operator.index takes a bool (True is 1) and a 0-d bool tensor: a flag where an offset belongs is a
    # mistake, not column 1. numpy's bools (scalars, 0-d arrays) by their dtype's kind: no numpy import.
    # Ints first: they are the common case, and Dynamo cannot trace getattr with a default on them.
    if isinstance(offset, (int, torch.SymInt)):
        return isinstance(offset, bool)
    if isinstance(offset, torch.Tensor):
        return offset.dtype == torch.bool
    return getattr(getattr(offset, "dtype", None), "kind", None) == "b"


def _as_offset(offset) -> int:
    # operator.index refuses floats (numpy's too) and float tensors, but takes a 1-element integer tensor of
    # any rank (a 2-D tensor's rows): a tensor must be 0-d, as a number is.
    if isinstance(offset, torch.Tensor) and offset.dim() != 0:
        raise TypeError(f"a {offset.dim()}-D tensor")
    return operator.index(offset)


def as_offsets(slice_offsets: Sequence[int]) -> list[int]:
    """Slice offsets as a list of Python ints; a TypeError naming slice_offsets otherwise.

    Takes a sequence (a list, tuple, range, 1-D tensor or numpy array) of ints, numpy ints, or 0-d
    integer tensors or arrays. Refuses bytes and text, floats of every kind (torch's int[] parser truncates numpy
    float32 scalars and float tensors, 15.9 -> 15), bools of every kind, tensors that are not 0-d, and
    sets, dicts and iterators. The eager path hands every form but a list or tuple of Python ints to
    this function, so every path accepts exactly these (contract section 6).
    """
    if not _is_offsets_sequence(slice_offsets):
        raise TypeError(f"slice_offsets must be a sequence of ints (a list, tuple, range, or 1-D integer tensor "
                        f"or array), got {type(slice_offsets).__name__} {slice_offsets!r}")
    if any(_is_bool(o) for o in slice_offsets):
        raise TypeError(f"slice_offsets must be a sequence of ints, got bools in {slice_offsets!r}")
    try:
        return [_as_offset(o) for o in slice_offsets]
    except TypeError:
        raise TypeError(f"slice_offsets must be a sequence of ints, got {slice_offsets!r}") from None


def check_slice_offsets(slice_offsets: Sequence[int], d_s: int, d_out: int) -> tuple[int, ...]:
    """Slices [off, off + d_s) must be ints, fit in d_out, and not overlap (touching is fine, any order).

    Shared by the ops and by layers that validate their slices once at construction.
    """
    offsets = tuple(as_offsets(slice_offsets))
    for off in offsets:
        if off < 0 or off + d_s > d_out:
            raise ValueError(
                f"slice_offsets: slice [{off}, {off + d_s}) of width d_s = {d_s} lies outside the projection's "
                f"{d_out} output features (it must fit in d_out = {d_out})"
            )
    ordered = sorted(offsets)
    for lo, hi in zip(ordered, ordered[1:]):
        if hi < lo + d_s:
            raise ValueError(f"slice_offsets {list(offsets)} give overlapping slices of width d_s = {d_s}")
    return offsets


def _check_x(x: torch.Tensor) -> None:
    _check_rank("x", x, 3, "(B, T, d_in)")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")


def check_mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps) -> None:
    # Types first: every later check reads .dtype / .shape, which a list or number lacks.
    check_tensors(x=x, weight=weight, bias=bias, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    _check_x(x)
    x_shape, dtype, device = x.shape, x.dtype, x.device
    _check_rank("weight", weight, 2, "(d_out, d_in)")
    w_shape = weight.shape
    _check_dim("weight", w_shape, 1, x_shape[2], "d_in (the width of x)", "(d_out, d_in)")
    d_out = w_shape[0]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; x, weight and bias share one dtype")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all inputs must share one device")
    if bias is not None:
        _check_rank("bias", bias, 1, "(d_out,)")
        _check_dim("bias", bias.shape, 0, d_out, "d_out (the rows of weight)", "(d_out,)")
    check_memory(
        dtype, device, x_shape[2], query, keys, bank_a, bank_b, x_shape[0], slice_offsets, d_out,
        separation, scale, eps,
    )


def check_mira_adapter(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps) -> None:
    check_tensors(x=x, out=out, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    _check_x(x)
    _check_rank("out", out, 3, "(B, T, d_out)")
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype} but x has {x.dtype}; they must match")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}; all inputs must share one device")
    _check_dim("out", out.shape, 0, x.shape[0], "B (the batch of x)", "(B, T, d_out)")
    _check_dim("out", out.shape, 1, x.shape[1], "T (the tokens of x)", "(B, T, d_out)")
    check_memory(
        x.dtype, x.device, x.shape[2], query, keys, bank_a, bank_b, x.shape[0], slice_offsets, out.shape[2],
        separation, scale, eps,
    )
    check_out_overlap(out, x=x, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)


# ----------------------------------------------------------------------------------------------
# Overlapping memory (contract section 6): an in-place op writes every element of `out` while it
# reads its inputs, so out must not overlap itself, nor any input, except by being x itself
# (the very same view), which every backend supports (x is read in full before out is written).
# ----------------------------------------------------------------------------------------------


def provably_no_internal_overlap(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when no two elements share memory, proved by the rule: with the dimensions of size > 1
    sorted by stride, each stride exceeds the offset span of all smaller ones. Every view made by
    slicing, transposing or offsetting a tensor that has no overlap passes; an expanded dimension
    (stride 0) or interleaved strides from as_strided do not."""
    if any(n == 0 for n in sizes):
        return True
    span = 0
    for stride, size in sorted((st, n) for n, st in zip(sizes, strides) if n > 1):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _has_memory(t: torch.Tensor) -> bool:
    # Traced calls (FakeTensor), meta tensors and functorch's wrappers (torch.vmap's BatchedTensor,
    # torch.func.grad's) have no addresses of their own: the op kernel checks the real call.
    return (t.device.type != "meta" and not torch._subclasses.fake_tensor.is_fake(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_out_overlap(out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """``out`` must not overlap itself, and its memory span must not meet any input's, unless
    that input is exactly ``out`` (the same address, shape, strides and dtype; only x can be)."""
    if torch.compiler.is_compiling() or not _has_memory(out):
        return
    if not provably_no_internal_overlap(out.shape, out.stride()):
        raise ValueError(
            f"out has elements that share memory (shape {tuple(out.shape)}, strides {out.stride()}, e.g. an "
            "expanded tensor); mira_adapter_ writes every element of out, so out must not overlap itself"
        )
    if out.numel() == 0:
        return
    lo, hi = _byte_span(out)
    for name, t in inputs.items():
        if t.numel() == 0 or not _has_memory(t):
            continue
        if (t.data_ptr() == out.data_ptr() and t.dtype == out.dtype and t.shape == out.shape
                and t.stride() == out.stride()):
            continue  # out is this very view (out = x): allowed
        t_lo, t_hi = _byte_span(t)
        if t_lo < hi and lo < t_hi:
            raise ValueError(
                f"out overlaps {name} in memory; mira_adapter_ reads {name} while it writes out, so out must not "
                f"share memory with any input (it may be x itself: the same view)"
            )


def check_tensors(**named) -> None:
    """TypeError naming the first argument that is not a Tensor (None allowed for bias)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{name} must be a Tensor of shape {_LAYOUTS[name]}, got {type(t).__name__}")


_LAYOUTS = {"x": "(B, T, d_in)", "weight": "(d_out, d_in)", "bias": "(d_out,)", "query": "(B, d_k)",
            "keys": "(N, d_k)", "bank_a": "(N, S, r, d_in)", "bank_b": "(N, S, d_s, r)", "out": "(B, T, d_out)"}


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raises ValueError naming the first input that holds inf or NaN (scans the data). Under
    torch.compile an asynchronous assert instead (a RuntimeError with the same message): a branch
    on the data would break the graph, and fullgraph=True refuse it."""
    compiling = torch.compiler.is_compiling()
    for name, t in tensors.items():
        if t is None or not t.is_floating_point() or t.device.type == "meta":  # meta tensors hold no values
            continue
        message = f"{name} contains inf or NaN (the finiteness check is on: MIRA_CHECK_FINITE or check_finite())"
        if compiling:
            torch._assert_async(torch.isfinite(t).all(), message)
        elif not bool(torch.isfinite(t).all()):
            raise ValueError(message)
