"""The phases of ``benchmarks.gpu_check`` that import torch, each run in a process of its own.

``python -m benchmarks._gpu_check_phases {env,op,model} --partial FILE --budget S --workload JSON``

Each phase keeps its record in ``FILE`` and rewrites it (atomically) after every measurement,
so a phase killed at its time limit still leaves what it measured; ``status`` becomes ``ok``
only when the phase finished. ``env`` runs from the checkout before anything is built; ``op`` and
``model`` run from the build phase's tree, with its extension. The record formats are those of
``benchmarks/gpu_check.schema.json`` (see ``benchmarks/gpu_check.py``).

Timing method (``op`` and ``model``): per (dtype, batch) cell, every variant is first run once
and checked, then the variants that ran are timed interleaved (``benchmarks._pairs``: one call of
each per round in a shuffled order, medians over rounds with distribution-free 95% intervals,
ratios over the baseline as the median of per-round ratios), each call between CUDA events with
the L2 cache flushed before it (``benchmarks.latency.DeviceTimer``); then the same with every
variant captured in a CUDA graph and replayed; then (``op``) each variant's kernels are timed by
``torch.profiler`` and summed per kernel name. A cell's time is its share of what is left of
the budget, so every cell gets measured, with fewer rounds when time is short.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Packages whose versions the record names (distribution names).
VERSIONED = ("torch", "triton", "timm", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "safetensors", "ninja",
             "setuptools", "pybind11")
GROSS_REL_ERR = 0.05  # a result this far from the float64 reference is wrong, not imprecise


class Partial:
    """A phase's record, rewritten to disk after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"status": "running", "reason": None}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, row: dict) -> None:
        self.data.setdefault("measurements", []).append(row)
        self.flush()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


# ----------------------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _command_output(cmd: list[str], timeout: float = 20.0) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _driver_version() -> str | None:
    out = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    return None


def _nvcc() -> tuple[str | None, str | None]:
    # setup.py prefers /usr/local/cuda when CUDA_HOME is unset; look where it will look.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    candidates += [Path("/usr/local/cuda/bin/nvcc")]
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.exists():
            out = _command_output([str(path), "--version"]) or ""
            release = next((ln.split("release", 1)[1].split(",")[0].strip() for ln in out.splitlines()
                            if "release" in ln), None)
            return str(path), release
    return None, None


def run_env(rec: Partial, deadline: float, workload: dict, device: str = "cuda") -> None:
    from benchmarks.gpu_check import _PHASE_IMPORTS

    env: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {dist: _version(dist) for dist in VERSIONED},
        "problems": [],
    }
    rec.data["environment"] = env
    rec.flush()  # what is known so far survives a hang below (a driver query, a CUDA initialisation)
    problems = env["problems"]
    env["nvcc_path"], env["nvcc"] = _nvcc()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
        env["torch"], env["torch_error"] = None, _short(exc)
        problems.append(f"torch does not import: {_short(exc)}; nothing can run")
        rec.flush()
        return
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["gpu"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "count": torch.cuda.device_count(),
            "driver": _driver_version(),
        }
        env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    else:
        env["cuda_reason"] = ("torch is a CPU-only build" if torch.version.cuda is None
                              else "torch.cuda.is_available() is False")
        problems.append(f"no CUDA device ({env['cuda_reason']}): only the environment is checked here")
    if env["nvcc"] is None:
        problems.append("no nvcc found: the CUDA C++ backend cannot be built (Triton can still run)")
    for dist, consequence in (("triton", "the Triton backend cannot run"), ("timm", "the model phase is skipped"),
                              ("pytest", "the gpu tests are skipped")):
        if env["versions"].get(dist) is None:
            problems.append(f"{dist} is not installed: {consequence}")
    imports = {}
    for module in _PHASE_IMPORTS:
        try:
            importlib.import_module(module)
            imports[module] = None
        except Exception as exc:  # noqa: BLE001
            imports[module] = _short(exc)
            problems.append(f"import {module} failed: {_short(exc)}")
    env["imports"] = imports
    rec.flush()


# ----------------------------------------------------------------------------------------------
# Shared by op and model.
# ----------------------------------------------------------------------------------------------


def _mira_backends(device) -> tuple[list[str], dict[str, str]]:
    """The MIRA backends to time on ``device``'s tensors, and why any other backend is left out."""
    import mira_kernels as mk

    excluded = {}
    names = mk.available_backends(device)
    for name in mk.BACKENDS:
        if name in names:
            continue
        try:  # the router's own explanation of why this backend cannot run on CUDA tensors
            with mk.use_backend(name):
                mk.resolve_backend(device)
            excluded[name] = f"not listed by available_backends({device.type!r})"
        except Exception as exc:  # noqa: BLE001
            excluded[name] = str(exc)
    if not mk.build_info()["extension_loaded"]:
        # Without the extension every public op runs the reference whatever the name: time it once, as such.
        for name in names:
            if name != "reference":
                excluded[name] = "mira_kernels._C did not load, so this backend would silently run the reference"
        names = [n for n in names if n == "reference"]
    return names, excluded


def _bound(value: float, scale: float = 1.0) -> float | None:
    # An interval from fewer than 6 rounds is unbounded (_pairs.median_ci): null in the JSON,
    # which has no infinity.
    return value * scale if math.isfinite(value) else None


def _stat_us(result, name: str) -> dict:
    m = result.median(name)
    return {"median": m["seconds"] * 1e6, "lo": _bound(m["lo"], 1e6), "hi": _bound(m["hi"], 1e6),
            "rounds": m["rounds"]}


def _ratio(result, num: str, den: str) -> dict | None:
    if den not in result.times or num == den:
        return None
    r = result.ratio(num, den)
    return {"ratio": r["ratio"], "lo": _bound(r["lo"]), "hi": _bound(r["hi"]), "pairs": r["pairs"]}


def _capture(fn: Callable[[], object]) -> tuple[object, Callable[[], object]]:
    """Captures ``fn`` (inputs fixed) in a CUDA graph; returns (graph, its replay)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph, graph.replay


def kernel_times(fn: Callable[[], object], calls: int = 5) -> list[dict]:
    """Device time per call of every kernel (and memset / memcpy) ``fn`` launches, by name, from ``torch.profiler``."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_name.setdefault(event.name, []).append(event.time_range.elapsed_us())
    rows = [{"name": name, "calls": len(d) / calls, "us": sum(d) / calls} for name, d in per_name.items()]
    return sorted(rows, key=lambda r: -r["us"])


def _time_cell(fns: dict, baseline: str, budget: float, timer, max_rounds: int) -> tuple[object | None, dict[str, str]]:
    """Interleaved rounds of ``fns`` for at most ``budget`` seconds; returns (PairResult or None, errors)."""
    from benchmarks import _pairs

    if not fns:
        return None, {}
    t0 = time.monotonic()
    errors = {}
    for name, fn in list(fns.items()):  # one timed call each: sizes the rounds, and catches late failures
        try:
            timer(fn)
        except Exception as exc:  # noqa: BLE001
            errors[name] = _short(exc)
            del fns[name]
    per_round = max(time.monotonic() - t0, 1e-4)
    # At least 3 rounds even when the share is spent (a median needs them); the phase's deadline
    # stops the cells after this one instead.
    rounds = max(3, int(max(budget - per_round, 0.0) / per_round))
    if not fns:
        return None, errors
    watch = [(n, baseline) for n in fns if n != baseline] if baseline in fns else []
    result = _pairs.time_interleaved(fns, watch=watch, target_width=None, budget_s=budget - per_round,
                                     min_rounds=min(3, max_rounds), max_rounds=max(min(rounds, max_rounds), 1),
                                     check_every=10, warmup=0, timer=timer)
    return result, errors


def _rel_err(got, want) -> float:
    import torch

    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    den = torch.linalg.vector_norm(want).item()
    return torch.linalg.vector_norm(got - want).item() / (den if den > 0 else 1.0)


def _finite_check(check: dict | None) -> dict | None:
    """JSON has no inf: a non-finite output is recorded as finite=False with rel_err null."""
    if check is None:
        return None
    out = dict(check, finite=math.isfinite(check["rel_err"]))
    for key in ("rel_err", "pytorch_rel_err"):
        if out.get(key) is not None and not math.isfinite(out[key]):
            out[key] = None
    return out


def _measure(rec: Partial, *, mode: str, dtype_name: str, batch: int, variants: dict, checks: dict,
             baseline: str, kinds: dict, budget: float, profile: bool, timer, device, max_rounds: int) -> None:
    """Times one cell: eager (events) and graph replay of every variant that passed its run, then kernels."""
    import torch

    start = time.monotonic()
    rows = {}
    for name in variants:
        kind, backend = kinds[name]
        check = checks.get(name, {})
        rows[name] = {
            "mode": mode, "dtype": dtype_name, "batch": batch, "variant": name, "kind": kind, "backend": backend,
            "ok": check.get("error") is None and check.get("rel_err", 0.0) <= GROSS_REL_ERR,
            "error": check.get("error"), "check": _finite_check(check.get("check")), "baseline": baseline,
            "eager_us": None, "graph_us": None, "graph_error": None, "vs_baseline": {"eager": None, "graph": None},
            "kernels": None, "kernel_us_total": None, "kernels_error": None,
        }
    runnable = {n: fn for n, fn in variants.items() if rows[n]["error"] is None}
    share = budget * (0.45 if profile else 0.5)
    eager, errors = _time_cell(dict(runnable), baseline, share, timer, max_rounds)
    for name, err in errors.items():
        rows[name].update(ok=False, error=err)
    if eager is not None:
        for name in eager.names:
            rows[name]["eager_us"] = _stat_us(eager, name)
            rows[name]["vs_baseline"]["eager"] = _ratio(eager, name, baseline)
    graphs, replays = {}, {}
    # The reference is the likeliest to refuse capture (host syncs): capture it last, so that a
    # capture that leaves the device in a bad state costs no other variant its graph timing.
    for name, fn in sorted(runnable.items(), key=lambda item: "reference" in item[0]):
        if rows[name]["error"] is not None:
            continue
        if device.type != "cuda":
            rows[name]["graph_error"] = f"CUDA graphs need a CUDA device, not {device.type}"
            continue
        try:
            graphs[name], replays[name] = _capture(fn)
        except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the variant
            rows[name]["graph_error"] = _short(exc)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    left = budget - (time.monotonic() - start)
    graph, errors = _time_cell(replays, baseline, left * (0.6 if profile else 0.95), timer, max_rounds)
    for name, err in errors.items():
        rows[name]["graph_error"] = err
    if graph is not None:
        for name in graph.names:
            rows[name]["graph_us"] = _stat_us(graph, name)
            rows[name]["vs_baseline"]["graph"] = _ratio(graph, name, baseline)
    del graphs, replays
    if profile:
        for name, fn in runnable.items():
            if rows[name]["error"] is not None:
                continue
            if time.monotonic() - start > budget:
                rows[name]["kernels_error"] = "not profiled: the cell's share of the phase budget was spent"
                continue
            if device.type != "cuda":
                rows[name]["kernels_error"] = f"kernel times need a CUDA device, not {device.type}"
                continue
            try:
                kernels = kernel_times(fn)
            except Exception as exc:  # noqa: BLE001
                rows[name]["kernels_error"] = _short(exc)
                continue
            rows[name]["kernels"] = kernels
            rows[name]["kernel_us_total"] = sum(k["us"] for k in kernels)
    for row in rows.values():
        rec.add(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cells(workload: dict, modes: tuple[str, ...]) -> list[tuple[str, str, int]]:
    cells = []
    if "forward" in modes:
        cells += [("forward", dt, b) for dt in workload["dtypes"] for b in workload["batches"]]
    if "training" in modes:
        cells += [("training", dt, workload["train_batch"]) for dt in workload["dtypes"]]
    return cells


def _timing_meta(baseline: str, device) -> tuple[Callable, dict]:
    import torch

    from benchmarks.latency import DeviceTimer

    timer = DeviceTimer(device, flush_l2=True)
    return timer, {
        "eager": timer.describe() + "; variants interleaved in shuffled rounds (benchmarks._pairs)",
        "graph": "each variant captured in a CUDA graph (inputs fixed), replays timed as above",
        "statistic": "median over rounds with a distribution-free 95% interval (order statistics; null below 6 "
                     "rounds); ratios are medians of "
                     f"per-round ratios over {baseline}",
        "kernels": "torch.profiler device events of 5 eager calls, summed per name, per call",
        "units": "microseconds",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


# ----------------------------------------------------------------------------------------------
# op: the qkv projection.
# ----------------------------------------------------------------------------------------------


def _op_inputs(workload: dict, batch: int, seed: int):
    import torch

    w = workload
    g = torch.Generator().manual_seed(seed)
    n, s, r, d_in, d_out = w["slots"], len(w["slice_offsets"]), w["rank"], w["d_in"], w["d_out"]
    d_s = d_in  # Q and V slices of a packed qkv are each d_in wide
    x = torch.randn(batch, w["tokens"], d_in, generator=g, dtype=torch.float64)
    # A trained memory's keys sit near the queries of their tasks. Independent random queries and
    # keys instead give cosines of about +-1/sqrt(d), whose sum the affine separation divides by:
    # weights in the tens, and a 16-bit eager baseline (scores rounded to bf16) rel err 5.6e-2 at
    # B=256 on the H200 (2026-12-04). Queries and keys share a direction: cosines ~0.8, weights ~1/N.
    common = torch.randn(d_in, generator=g, dtype=torch.float64)
    x[:, 0] = common + 0.5 * torch.randn(batch, d_in, generator=g, dtype=torch.float64)
    return {
        "x": x,
        "weight": torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in),
        "bias": 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64),
        "keys": common + 0.5 * torch.randn(n, d_in, generator=g, dtype=torch.float64),
        "bank_a": torch.randn(n, s, r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in),
        "bank_b": 0.05 * torch.randn(n, s, d_s, r, generator=g, dtype=torch.float64),
    }


#: The op phase's cuBLAS GEMM + mira_adapter_ variant (run_op).
SPLIT_VARIANT = "mira[cublas+triton adapter_]"


def run_op(rec: Partial, deadline: float, workload: dict, device: str = "cuda") -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import mira_kernels as mk
    from benchmarks import gemm_probe
    from benchmarks.eager_mira import EagerMiraLinear
    from mira_kernels import reference

    dev = torch.device(device)
    backends, excluded = _mira_backends(dev)
    timer, meta = _timing_meta("linear", dev)
    # The plain Triton GEMM of benchmarks.gemm_probe beside cuBLAS, 16-bit cells only: how near a
    # Triton base GEMM gets (issue 17's design question), not a MIRA variant.
    probe_off = gemm_probe.unavailable_reason(dev)
    probes = {} if probe_off else {f"probe[{c.name}]": c for c in gemm_probe.CONFIGS}
    # The product's Triton forward with its GEMM's x, W and output tiles through TMA descriptors
    # (configs.overriding(tma=True)), and that GEMM also persistent (one program per SM walking the
    # work items, as the probe's), same cells: how much of the fused GEMM's gap to cuBLAS the loads
    # are, and the schedule. Overridden plans are planned on every call (never cached): read their
    # graph times and kernels.
    tma_off = probe_off or (None if "triton" in backends else "the triton backend is not available here")
    sms = None if tma_off else torch.cuda.get_device_properties(dev).multi_processor_count
    tma = {} if tma_off else {"mira[triton+tma]": dict(tma=True),
                              "mira[triton+tma+persistent]": dict(tma=True, persistent=sms)}
    # cuBLAS's GEMM (F.linear), then the triton backend's mira_adapter_ (retrieval, shrink, and the
    # expand read-modify-writing the Q/V slices): vLLM's LoRA layout, which the GPU model prices at half
    # the fused forward's overhead at B >= 64 (benchmarks/results/gpu_model.txt), forward cells only.
    split = {SPLIT_VARIANT: ("mira", "triton")} if "triton" in backends else {}
    variants = ["linear", "eager"] + [f"mira[{b}]" for b in backends] + list(probes) + list(tma) + list(split)
    kinds = {"linear": ("linear", None), "eager": ("eager", None), **{f"mira[{b}]": ("mira", b) for b in backends},
             **{name: ("probe", None) for name in probes}, **{name: ("mira", "triton") for name in tma}, **split}
    if probe_off:
        excluded["probe"] = probe_off
    if tma_off:
        excluded["triton+tma"] = tma_off
    rec.data.update(variants=variants, excluded=excluded, timing=meta, measurements=[], not_measured=[])
    rec.flush()
    opts = dict(slice_offsets=workload["slice_offsets"], separation=workload["separation"], scale=workload["scale"])
    cells = _cells(workload, ("forward", "training"))
    for i, (mode, dtype_name, batch) in enumerate(cells):
        left = deadline - time.monotonic()
        if left < 1.0:
            rec.data["not_measured"] += [{"mode": m, "dtype": d, "batch": b} for m, d, b in cells[i:]]
            rec.data["status"] = "timeout"
            rec.data["reason"] = f"the phase budget ran out: {len(cells) - i} of {len(cells)} cells not measured"
            rec.flush()
            return
        budget = left / (len(cells) - i)
        dtype = getattr(torch, dtype_name)
        base64 = {k: v.to(dev) for k, v in _op_inputs(workload, batch, workload["seed"] + batch).items()}
        low = {k: v.to(dtype) for k, v in base64.items()}
        exact = {k: v.double() for k, v in low.items()}  # the rounded values, in float64: the specification's input
        linear = nn.Linear(workload["d_in"], workload["d_out"], device=dev, dtype=dtype).requires_grad_(False)
        linear.weight.copy_(low["weight"])
        linear.bias.copy_(low["bias"])
        eager = EagerMiraLinear(linear, low["keys"], low["bank_a"], low["bank_b"], workload["slice_offsets"],
                                scale=workload["scale"])
        if mode == "forward":
            half = dtype.itemsize == 2
            fns, checks = _op_forward(low, exact, eager, backends, opts, mk, reference, F, probes if half else {},
                                      tma if half else {})
        else:
            fns, checks = _op_training(low, exact, eager, backends, opts, mk, reference, F, dev)
        _measure(rec, mode=mode, dtype_name=dtype_name, batch=batch, variants=fns, checks=checks, baseline="linear",
                 kinds=kinds, budget=budget, profile=True, timer=timer, device=dev,
                 max_rounds=workload["max_rounds"])
        del fns, eager, linear, low, exact, base64
    rec.data["status"] = "ok"
    rec.flush()


def _check_each(fns: dict, want_of: Callable[[str], object], compare: Callable[[object, object], float],
                pytorch_err: dict) -> dict:
    checks = {}
    for name, fn in fns.items():
        try:
            got = fn()
            err = compare(got, want_of(name))
            checks[name] = {"rel_err": err, "check": {"against": pytorch_err["against"], "rel_err": err,
                                                      "pytorch_rel_err": pytorch_err["value"].get(name)}}
        except Exception as exc:  # noqa: BLE001
            checks[name] = {"error": _short(exc), "check": None}
    return checks


def _op_forward(low, exact, eager, backends, opts, mk, reference, F, probes, tma=None):
    import torch

    from benchmarks import gemm_probe

    x = low["x"]
    query = x[:, 0]
    fns = {"linear": lambda: F.linear(x, low["weight"], low["bias"]), "eager": lambda: eager(x)}
    for name, config in probes.items():
        fns[name] = lambda c=config: gemm_probe.linear(x, low["weight"], low["bias"], c)
    for b in backends:
        def call(b=b):
            with mk.use_backend(b):
                return mk.mira_linear(x, low["weight"], low["bias"], query, low["keys"], low["bank_a"], low["bank_b"],
                                      **opts)
        fns[f"mira[{b}]"] = call
    if "triton" in backends:
        def call_split():
            y = F.linear(x, low["weight"], low["bias"])
            with mk.use_backend("triton"):
                return mk.mira_adapter_(y, x, query, low["keys"], low["bank_a"], low["bank_b"], **opts)
        fns[SPLIT_VARIANT] = call_split
    for name, overrides in (tma or {}).items():
        def call_tma(overrides=overrides):
            from mira_kernels.triton import configs as triton_configs  # only where the backend runs

            with mk.use_backend("triton"), triton_configs.overriding(**overrides):
                return mk.mira_linear(x, low["weight"], low["bias"], query, low["keys"], low["bank_a"], low["bank_b"],
                                      **opts)
        fns[name] = call_tma
    with torch.no_grad():
        e = exact
        want_mira = reference.mira_linear(e["x"], e["weight"], e["bias"], e["x"][:, 0], e["keys"], e["bank_a"],
                                          e["bank_b"], **opts)
        want_linear = F.linear(e["x"], e["weight"], e["bias"])
        same = reference.mira_linear(x, low["weight"], low["bias"], query, low["keys"], low["bank_a"], low["bank_b"],
                                     **opts)
        pytorch = {"linear": _rel_err(F.linear(x, low["weight"], low["bias"]), want_linear),
                   "mira": _rel_err(same, want_mira)}
        plain = {"linear", *probes}  # variants that compute the plain projection
        per_variant = {n: pytorch["linear" if n in plain else "mira"] for n in fns}
        checks = _check_each(fns, lambda n: want_linear if n in plain else want_mira, _rel_err,
                             {"against": "float64 reference of the same rounded inputs", "value": per_variant})

    def no_grad(fn):
        def wrapped():
            with torch.no_grad():
                return fn()
        return wrapped

    return {n: no_grad(fn) for n, fn in fns.items()}, checks


def _op_training(low, exact, eager, backends, opts, mk, reference, F, dev):
    """Forward + backward into x (and the keys for MIRA): a consolidation step of one projection."""
    import torch

    x = low["x"].detach().requires_grad_(True)
    keys = low["keys"].detach().requires_grad_(True)
    eager.keys.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(x.shape[0], x.shape[1], low["weight"].shape[0], generator=g,
                           dtype=torch.float64).to(device=dev, dtype=x.dtype)

    def mira_step(b, xx, kk, w, bias, a, bb):
        with mk.use_backend(b):
            y = mk.mira_linear(xx, w, bias, xx[:, 0], kk, a, bb, **opts)
        return torch.autograd.grad(y, (xx, kk), grad_out.to(y.dtype))

    fns = {
        "linear": lambda: torch.autograd.grad(F.linear(x, low["weight"], low["bias"]), (x,), grad_out),
        "eager": lambda: torch.autograd.grad(eager(x), (x, eager.keys), grad_out),
    }
    for b in backends:
        fns[f"mira[{b}]"] = lambda b=b: mira_step(b, x, keys, low["weight"], low["bias"], low["bank_a"], low["bank_b"])

    e = exact
    x64 = e["x"].detach().requires_grad_(True)
    k64 = e["keys"].detach().requires_grad_(True)
    y64 = reference.mira_linear(x64, e["weight"], e["bias"], x64[:, 0], k64, e["bank_a"], e["bank_b"], **opts)
    want_mira = torch.autograd.grad(y64, (x64, k64), grad_out.double())
    want_linear = torch.autograd.grad(F.linear(x64, e["weight"], e["bias"]), (x64,), grad_out.double())

    def compare(got, want):
        return max(_rel_err(g_, w_) for g_, w_ in zip(got, want))

    xs = low["x"].detach().requires_grad_(True)
    ks = low["keys"].detach().requires_grad_(True)
    ys = reference.mira_linear(xs, low["weight"], low["bias"], xs[:, 0], ks, low["bank_a"], low["bank_b"], **opts)
    same_mira = torch.autograd.grad(ys, (xs, ks), grad_out)
    same_linear = torch.autograd.grad(F.linear(xs, low["weight"], low["bias"]), (xs,), grad_out)
    per_variant = {n: compare(same_linear, want_linear) if n == "linear" else compare(same_mira, want_mira)
                   for n in fns}
    checks = _check_each(fns, lambda n: want_linear if n == "linear" else want_mira, compare,
                         {"against": "float64 reference gradients (dx, and dkeys for MIRA) of the same rounded inputs",
                          "value": per_variant})
    return fns, checks


# ----------------------------------------------------------------------------------------------
# model: ViT-B/16 forward.
# ----------------------------------------------------------------------------------------------


def _sharing_copy(model):
    # A structural copy whose parameters and buffers are the same tensors (one copy of the weights).
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo=memo)


def _block_queries(stock, attached, images) -> list:
    """Each MIRA projection's query (its input's CLS token, the default identity query) for
    ``images``, read from the stock model at the same module names, in ``mira.memories`` order."""
    import torch

    import mira

    names = {id(m): name for name, m in attached.named_modules()}
    stock_modules = dict(stock.named_modules())
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for projection in mira.projections(attached):
        memory = projection.memory

        def grab(_module, args, memory=memory):
            seen.setdefault(id(memory), args[0][:, 0].detach().clone())

        hooks.append(stock_modules[names[id(projection)]].register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            stock(images)
    finally:
        for h in hooks:
            h.remove()
    return [seen[id(m)] for m in mira.memories(attached)]


def _vit_variants(workload: dict, dtype, dev, backends: list[str]):
    import timm
    import torch

    import mira
    import mira_kernels as mk
    from benchmarks.eager_mira import attach_eager

    torch.manual_seed(workload["seed"])
    # model_kwargs (tests: a tiny ViT of the same family) go to the timm constructor.
    stock = timm.create_model(workload["model"], pretrained=False, **workload.get("model_kwargs", {}))
    stock = stock.to(device=dev, dtype=dtype)
    stock.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(workload["seed"] + 1)
    size = stock.patch_embed.img_size
    example = torch.randn(2, stock.patch_embed.proj.in_channels, *size, generator=g).to(device=dev, dtype=dtype)
    attached = _sharing_copy(stock)
    mira.attach(attached, rank=workload["rank"], slices=tuple(workload["slices"]), query="identity",
                separation=workload["separation"], scale=workload["scale"], example_input=example)
    # Keys near the queries they will meet, as after consolidation: each block's query (the CLS
    # token of its qkv input) for the example images, plus noise. Random keys make the affine
    # weights ill-conditioned (cosines ~+-1/sqrt(d) summed), and then bf16 runs of the eager
    # baseline and of every backend disagree by rel err 0.6-1 at B >= 8 (H200, 2026-12-04) while
    # each is as accurate as its inputs allow: a check of nothing.
    queries = _block_queries(stock, attached, example)
    for memory, q in zip(mira.memories(attached), queries):
        c = memory.config
        n = workload["slots"]
        bank_a = torch.randn(n, c.num_slices, c.rank, c.d_in, generator=g) / math.sqrt(c.d_in)
        # Strong enough that MIRA moves ViT-B's output by 10-15% of its norm: a backend that dropped the
        # adapters must fail the check (at 0.05 the change, 1.5e-2, was bf16's own noise).
        bank_b = torch.randn(n, c.num_slices, c.slice_width, c.rank, generator=g)
        q = q.double().cpu()
        spread = q.std(dim=0, keepdim=True).mean().clamp_min(1e-3)
        keys = (q[torch.arange(n) % q.shape[0]] + 0.5 * spread * torch.randn(n, c.d_k, generator=g,
                                                                             dtype=torch.float64)).float()
        memory.append(bank_a.to(device=dev, dtype=dtype), bank_b.to(device=dev, dtype=dtype),
                      keys.to(device=dev, dtype=dtype))
    mira.set_stage(attached, "inference")
    attached.eval()
    projection = mira.projections(attached)[0]
    eager = _sharing_copy(stock)
    # The keys the op sees (per-feature normalised by default), as benchmarks/latency.py passes them.
    memories = [(m.retrieval_keys()[: m.num_slots].detach(), *m.stored_adapters) for m in mira.memories(attached)]
    attach_eager(eager, memories, list(projection.slice_offsets), scale=projection.memory.config.scale,
                 eps=projection.memory.config.eps)
    eager.eval()

    models = {"stock": lambda x: stock(x), "eager": lambda x: eager(x)}
    for b in backends:
        def forward(x, b=b):
            with mk.use_backend(b):
                return attached(x)
        models[f"mira[{b}]"] = forward
    return models, size, stock.patch_embed.proj.in_channels, _layer_record(mira.memories(attached))


def _layer_record(memories) -> dict:
    """How the layers normalise their keys here, for benchmarks/gpu_model.py to price the run as it ran:
    the path mira.memory._per_feature_unit takes for these keys ('fused':
    mira_kernels.triton.normalize_columns; 'aten': mira.memory._unit_columns), and the memory's dtypes
    (attach makes it in the model's dtype unless bank_dtype is set)."""
    from mira import memory as mira_memory

    paths = {"fused" if mira_memory._fused_key_norm_applies(m.keys) else "aten" for m in memories}
    if len(paths) != 1:
        raise RuntimeError(f"the layers' keys take different normalisation paths: {sorted(paths)}")
    first = memories[0]
    return {"key_norm": paths.pop(), "keys": str(first.keys.dtype).removeprefix("torch."),
            "banks": str(first.bank_a.dtype).removeprefix("torch.")}


def run_model(rec: Partial, deadline: float, workload: dict, device: str = "cuda") -> None:
    import torch

    dev = torch.device(device)
    backends, excluded = _mira_backends(dev)
    timer, meta = _timing_meta("stock", dev)
    variants = ["stock", "eager"] + [f"mira[{b}]" for b in backends]
    kinds = {"stock": ("stock", None), "eager": ("eager", None), **{f"mira[{b}]": ("mira", b) for b in backends}}
    meta["kernels"] = "not profiled in this phase (see op)"
    # How the layers normalise their keys, per dtype, as each dtype's model is built (benchmarks/gpu_model.py
    # prices the run with it): mira.memory._fused_key_norm_applies on the keys themselves, whose dtype is the
    # model's. (The single key_norm before 2026-12-07 said 'fused' wherever the Triton helpers were there.)
    layer = {"key_norm_by_dtype": {}, "memory_dtypes": {}}
    rec.data.update(model=workload["model"], weights="random (timm pretrained=False)", variants=variants,
                    excluded=excluded, timing=meta, layer=layer, measurements=[], not_measured=[])
    rec.flush()
    cells = _cells(workload, ("forward",))
    built: dict = {}
    for i, (mode, dtype_name, batch) in enumerate(cells):
        left = deadline - time.monotonic()
        if left < 1.0:
            rec.data["not_measured"] += [{"mode": m, "dtype": d, "batch": b} for m, d, b in cells[i:]]
            rec.data["status"] = "timeout"
            rec.data["reason"] = f"the phase budget ran out: {len(cells) - i} of {len(cells)} cells not measured"
            rec.flush()
            return
        dtype = getattr(torch, dtype_name)
        if dtype_name not in built:
            built.clear()
            torch.cuda.empty_cache()
            built[dtype_name] = _vit_variants(workload, dtype, dev, backends)
            record = built[dtype_name][3]
            layer["key_norm_by_dtype"][dtype_name] = record["key_norm"]
            layer["memory_dtypes"][dtype_name] = {"keys": record["keys"], "banks": record["banks"]}
            rec.flush()
        models, size, channels, _ = built[dtype_name]
        budget = (deadline - time.monotonic()) / (len(cells) - i)
        g = torch.Generator().manual_seed(workload["seed"] + batch)
        images = torch.randn(batch, channels, *size, generator=g).to(device=dev, dtype=dtype)
        fns = {name: (lambda m=m, x=images: _no_grad_call(m, x)) for name, m in models.items()}
        checks = {}
        with torch.no_grad():
            outputs = {}
            for name, fn in fns.items():
                try:
                    outputs[name] = fn()
                except Exception as exc:  # noqa: BLE001
                    checks[name] = {"error": _short(exc), "check": None}
            want = outputs.get("eager")
            for name, out in outputs.items():
                if want is None or name in ("stock", "eager"):
                    checks[name] = {"check": None}
                    continue
                err = _rel_err(out, want)
                checks[name] = {"rel_err": err, "check": {
                    "against": "the eager baseline model in the same dtype (random weights and adapters)",
                    "rel_err": err, "pytorch_rel_err": None}}
            del outputs
        _measure(rec, mode=mode, dtype_name=dtype_name, batch=batch, variants=fns, checks=checks, baseline="stock",
                 kinds=kinds, budget=budget, profile=False, timer=timer, device=dev,
                 max_rounds=workload["max_rounds"])
        del images, fns
    rec.data["status"] = "ok"
    rec.flush()


def _no_grad_call(model, x):
    import torch

    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------


PHASES = {"env": run_env, "op": run_op, "model": run_model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=sorted(PHASES))
    p.add_argument("--partial", type=Path, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--workload", type=json.loads, required=True)
    p.add_argument("--device", default="cuda", help="where op and model run (cpu: the harness's own tests)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget
    rec = Partial(args.partial)
    try:
        PHASES[args.phase](rec, deadline, args.workload, args.device)
        if rec.data["status"] == "running":
            rec.data["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, then the process fails
        rec.data["status"] = "failed"
        rec.data["reason"] = _short(exc)
        rec.data["traceback"] = traceback.format_exc()[-3000:]
        rec.flush()
        traceback.print_exc()
        return 1
    rec.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
