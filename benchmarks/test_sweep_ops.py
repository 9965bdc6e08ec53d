"""Op-level sweeps of one adapted projection with pytest-benchmark (not part of ``make test``).

Run from the repository root::

    .venv/bin/python -m pytest benchmarks/test_sweep_ops.py --benchmark-json=benchmarks/results/sweep_ops.json

and compare two runs (e.g. two commits) with ``pytest-benchmark compare``. Select with ``-k``
(``-k "B8 and r4 and N30"``, ``-k fused``).

The shapes are ViT-B/16's packed qkv projection: x (B, 197, 768) -> (B, 197, 2304), adapters on the
Q and V slices (offsets 0 and 1536), identity query on the CLS token, affine separation. The sweep
moves one axis at a time around (B=8, r=4, N=30, float32): batch {1, 8, 32}, rank {4, 16, 64},
slots {1, 10, 30, 100}, dtype float32 / bfloat16 (memory side in float32 for bfloat16 x). At every
point four implementations are timed in the same group:

- ``linear``: the plain ``nn.Linear`` (the frozen projection alone);
- ``fused``: ``mira_kernels.mira_linear`` on the default backend (the C++ kernel on CPU);
- ``reference``: the same op on the plain-PyTorch reference backend (eager);
- ``compiled_reference``: ``torch.compile(dynamic=True)`` of the plain-PyTorch reference.

Each benchmark's ``extra_info`` holds the backend, throughput in images per second (from the
median), and the peak memory of one call: on CUDA the allocator's peak above the memory in use
before the call; on Linux CPUs the growth of the process's resident set high-water mark during one
call after ``malloc_trim`` (minimum of three calls: allocator slack inflates single readings).

These timings are pytest-benchmark's, one implementation after another, and are for comparing
runs; the headline overhead figures come from the interleaved pairs of ``benchmarks/latency.py``.
"""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch
import torch.nn as nn

import mira_kernels as mk
from mira_kernels import reference

T, D, D_OUT = 197, 768, 2304
OFFSETS = [0, 1536]
BASE = {"batch": 8, "rank": 4, "slots": 30, "dtype": "float32"}
AXES = {"batch": (1, 8, 32), "rank": (4, 16, 64), "slots": (1, 10, 30, 100), "dtype": ("float32", "bfloat16")}
IMPLS = ("linear", "fused", "reference", "compiled_reference")


def _points() -> list[dict]:
    points, seen = [], set()
    for axis, values in AXES.items():
        for v in values:
            p = {**BASE, axis: v}
            key = tuple(p.values())
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def _point_id(p: dict) -> str:
    return f"B{p['batch']}-r{p['rank']}-N{p['slots']}-{'bf16' if p['dtype'] == 'bfloat16' else 'fp32'}"


POINTS = _points()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(p: dict) -> dict:
    g = torch.Generator().manual_seed(p["batch"] * 1000 + p["rank"] * 10 + p["slots"])
    dtype = getattr(torch, p["dtype"])
    mem_dtype = torch.float32  # for 16-bit x the contract keeps the memory side in float32
    n, r = p["slots"], p["rank"]
    x = torch.randn(p["batch"], T, D, generator=g)
    lin = nn.Linear(D, D_OUT)
    with torch.no_grad():
        lin.weight.normal_(0, D**-0.5, generator=g)
    return {
        "x": x.to(DEVICE, dtype),
        "linear": lin.to(DEVICE, dtype).requires_grad_(False),
        "keys": torch.randn(n, D, generator=g).to(DEVICE, mem_dtype),
        "bank_a": (torch.randn(n, 2, r, D, generator=g) / D**0.5).to(DEVICE, mem_dtype),
        "bank_b": (0.05 * torch.randn(n, 2, D, r, generator=g)).to(DEVICE, mem_dtype),
    }


_compiled_reference = None


def _callable(impl: str, a: dict):
    x, lin = a["x"], a["linear"]
    w, b = lin.weight, lin.bias
    query = x[:, 0].to(a["keys"].dtype)  # identity query on the CLS token
    args = (x, w, b, query, a["keys"], a["bank_a"], a["bank_b"])
    if impl == "linear":
        return lambda: lin(x)
    if impl == "fused":
        return lambda: mk.mira_linear(*args, slice_offsets=OFFSETS, separation="affine")
    if impl == "reference":
        def run_reference():
            with mk.use_backend("reference"):
                return mk.mira_linear(*args, slice_offsets=OFFSETS, separation="affine")

        return run_reference
    global _compiled_reference
    if _compiled_reference is None:
        def spec(x, w, b, q, k, ba, bb):
            return reference.mira_linear(x, w, b, q, k, ba, bb, slice_offsets=OFFSETS, separation="affine")

        _compiled_reference = torch.compile(spec, dynamic=True)
    return lambda: _compiled_reference(*args)


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory_bytes(fn) -> int | None:
    """Peak memory one call of ``fn`` adds (see the module docstring); None where it cannot be read."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        readings = []
        for _ in range(3):
            libc.malloc_trim(0)  # give freed pages back, so a call's allocations show up as RSS growth
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
            before = _rss("VmRSS:")
            fn()
            readings.append(_rss("VmHWM:") - before)
        return max(0, min(readings))
    except OSError:
        return None


def _check(impl: str, out: torch.Tensor, a: dict) -> None:
    """The timed output is right: against the float64 reference, within 2x PyTorch's own error."""
    if impl == "linear":
        return
    x, lin = a["x"], a["linear"]
    f64 = [t.double() for t in (x, lin.weight, lin.bias, x[:, 0], a["keys"], a["bank_a"], a["bank_b"])]
    ref64 = reference.mira_linear(*f64, slice_offsets=OFFSETS, separation="affine")
    same = reference.mira_linear(x, lin.weight, lin.bias, x[:, 0].to(a["keys"].dtype), a["keys"], a["bank_a"],
                                 a["bank_b"], slice_offsets=OFFSETS, separation="affine")
    own = (same.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    floor = (1e-6 if x.dtype == torch.float32 else 1e-2) * max(1.0, ref64.abs().max().item())
    assert err <= 2 * own + floor, f"{impl}: error {err:.3g} vs float64 > 2 x PyTorch's {own:.3g} + {floor:.2g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("point", POINTS, ids=_point_id)
def test_sweep(benchmark, point: dict, impl: str) -> None:
    a = _inputs(point)
    fn = _callable(impl, a)

    def call():
        out = fn()
        _sync()
        return out

    with torch.inference_mode():
        out = call()  # compiles (compiled_reference) and warms up before any timing
        _check(impl, out, a)
        benchmark.group = _point_id(point)
        benchmark.extra_info.update(
            {**point, "impl": impl, "tokens": T, "d_in": D, "d_out": D_OUT, "device": str(DEVICE),
             "backend": (mk.resolve_backend(DEVICE, getattr(torch, point["dtype"])) if impl == "fused"
                         else ("reference" if impl != "linear" else "")),
             "threads": torch.get_num_threads()}
        )
        benchmark(call)
        benchmark.extra_info["images_per_s"] = point["batch"] / benchmark.stats.stats.median
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(call)
