"""Paired, interleaved timing with robust statistics: the measurement core of every benchmark here.

Why pairs: on a shared 2-core machine absolute times drift by tens of percent within a minute,
but two variants timed back to back see nearly the same machine. Each *round* times every
variant once, in a freshly shuffled order (so no variant always runs first, right after another
one's cache footprint); the statistic is the **median over rounds of the per-round ratio**
``time(num) / time(den)`` with a distribution-free 95% interval (order statistics). Medians, not means: the
per-pair ratios are heavy-tailed (another process grabs a core for a few ms).

Typical use::

    from benchmarks import _pairs

    result = _pairs.time_interleaved(
        {"linear": lambda: lin(x), "mira": lambda: mira(x)},
        watch=[("mira", "linear")],   # ratios whose interval decides when to stop
        target_width=0.006,           # stop once every watched 95% interval is narrower than +-0.3%
        budget_s=30.0,                # ... or after 30 s of rounds, whichever comes first
    )
    r = result.ratio("mira", "linear")   # {"ratio", "lo", "hi", "pairs", ...}
    t = result.median("mira")            # median time in seconds with its interval

Stopping rule: at least ``min_rounds`` rounds; then, every ``check_every`` rounds, stop when every
watched ratio's interval is narrower than ``target_width`` (absolute width ``hi - lo`` of the
ratio), or when ``budget_s`` seconds of rounds are spent, or after ``max_rounds``. The result
says which rule stopped it. Warm-up calls (``warmup`` per variant) are not recorded.

Python's cyclic garbage collector is paused while rounds run (as :mod:`timeit` does) and run
explicitly between rounds at every stopping-rule check: a collection that lands inside one timed
call charges that variant for allocations the others made.

A ``timer`` can replace the default wall clock: any ``timer(fn) -> seconds`` that calls ``fn`` once
(e.g. one that synchronises a CUDA device, or a scripted one in tests).

:func:`machine_info` records what the numbers were measured on (CPU model, cores, threads,
torch/MKL versions, load average); put it next to every result.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PairResult", "cpu_line", "machine_info", "median_ci", "process_timer", "ratio_stats", "record_json",
           "time_interleaved", "wall_timer"]


def median_ci(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` and its distribution-free interval: ``(median, lo, hi)``.

    The interval is the pair of order statistics that the binomial distribution puts around the
    median (SciPy's ``scipy.stats.quantile_test(...).confidence_interval``): it covers the true
    median with at least ``confidence`` for any continuous distribution, at every size. The
    percentile bootstrap used before covered less than its label at small sizes (simulated on
    heavy-tailed t3 data, 2026-12-07: 0.74 at 3 values, 0.91 at 13, 0.94 at 30). Below 6 values no
    pair of order statistics reaches 95%: the interval is then (-inf, inf), which no verdict reads
    as met or not met and no width target accepts. Values all equal give a degenerate interval.
    """
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("median_ci needs at least one value")
    med = float(np.median(v))
    if np.all(v == v[0]):
        return med, med, med
    ci = stats.quantile_test(v, q=med, p=0.5).confidence_interval(confidence)
    lo, hi = float(ci.low), float(ci.high)
    if np.isnan(lo) or np.isnan(hi):  # too few values for any interval at this confidence
        return med, -math.inf, math.inf
    return med, lo, hi


def ratio_stats(num: Sequence[float], den: Sequence[float], **kwargs) -> dict:
    """Median per-pair ratio ``num[i] / den[i]`` with its 95% interval, as a record."""
    if len(num) != len(den):
        raise ValueError(f"pairs need equal lengths, got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den)]
    med, lo, hi = median_ci(ratios, **kwargs)
    return {"ratio": med, "lo": lo, "hi": hi, "pairs": len(ratios), "width": hi - lo}


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def record_json(record, **kwargs) -> str:
    """A record as JSON text that strict parsers read: every non-finite number written as null.

    ``json.dumps`` writes ``Infinity`` / ``NaN``, which ``jq``, JavaScript and most JSON libraries
    refuse. The non-finite numbers a record holds are the bounds of an interval from fewer than 6
    rounds (:func:`median_ci`: unbounded) and quantities not measured on the device (a floor without a
    DRAM bandwidth on CUDA): null says "no value", which is what they are; readers of a record treat a
    null bound as unbounded. ``kwargs`` go to ``json.dumps`` (``indent``, ``sort_keys``)."""
    return json.dumps(_json_ready(record), allow_nan=False, **kwargs)


def wall_timer(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` by the monotonic wall clock (CPU work is synchronous)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def process_timer(fn: Callable[[], object]) -> float:
    """CPU seconds (all threads of this process) of one call of ``fn``.

    On an oversubscribed machine wall time mostly measures the scheduler; CPU time measures the
    work (plus any spin-waiting of idle worker threads). Report which timer a figure used.
    """
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


@dataclass
class PairResult:
    """Times (seconds) of every variant, one entry per round; rounds interleave the variants."""

    names: list[str]
    times: dict[str, list[float]]
    seconds: float
    stopped_by: str  # "target_width" | "budget" | "max_rounds"
    watch: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.times[self.names[0]]) if self.names else 0

    def ratio(self, num: str, den: str) -> dict:
        """Median per-round ratio num/den with its 95% interval."""
        return ratio_stats(self.times[num], self.times[den])

    def median(self, name: str) -> dict:
        """Median time of one variant (seconds) with its 95% interval."""
        med, lo, hi = median_ci(self.times[name])
        return {"seconds": med, "lo": lo, "hi": hi, "rounds": self.rounds}

    def summary(self) -> dict:
        return {
            "rounds": self.rounds,
            "seconds": self.seconds,
            "stopped_by": self.stopped_by,
            "medians_s": {n: float(np.median(self.times[n])) for n in self.names},
            "ratios": {f"{a}/{b}": self.ratio(a, b) for a, b in self.watch},
        }


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    watch: Sequence[tuple[str, str]] = (),
    target_width: float | None = 0.006,
    budget_s: float = 30.0,
    min_rounds: int = 30,
    max_rounds: int = 5000,
    check_every: int = 20,
    width_after: int = 0,
    warmup: int = 3,
    timer: Callable[[Callable[[], object]], float] = wall_timer,
    seed: int = 0,
) -> PairResult:
    """Times every callable once per round, in a shuffled order, until a stopping rule fires.

    Args:
        fns: name -> zero-argument callable (the work to time, already set up).
        watch: (num, den) name pairs whose ratio intervals decide when to stop; default: every
            variant against the first one.
        target_width: stop when every watched ratio's 95% interval (hi - lo) is at most this;
            None disables the rule (then the budget or max_rounds stops it).
        budget_s: wall-clock seconds of rounds after which it stops (warm-up excluded).
        min_rounds, max_rounds, check_every: bounds on the rounds, and how often to test the rule.
        width_after: the width rule applies only from this many rounds on (the budget from
            ``min_rounds`` on).
        warmup: untimed calls of every variant before the first round.
        timer: ``timer(fn) -> seconds`` for one call.
        seed: seed of the per-round shuffles (the result is reproducible up to timing noise).

    Returns:
        A :class:`PairResult` with the per-round times of every variant.
    """
    names = list(fns)
    if not names:
        raise ValueError("time_interleaved needs at least one callable")
    watch = list(watch) or [(n, names[0]) for n in names[1:]]
    for a, b in watch:
        if a not in fns or b not in fns:
            raise ValueError(f"watched pair ({a!r}, {b!r}) names a variant that is not timed")
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    order = list(names)
    stopped_by = "max_rounds"
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        for rnd in range(1, max_rounds + 1):
            rng.shuffle(order)
            for name in order:
                times[name].append(timer(fns[name]))
            if rnd % check_every == 0:
                gc.collect()
            if rnd < min_rounds:
                continue
            if time.perf_counter() - start >= budget_s:
                stopped_by = "budget"
                break
            if target_width is not None and watch and rnd % check_every == 0 and rnd >= width_after:
                if all(ratio_stats(times[a], times[b])["width"] <= target_width for a, b in watch):
                    stopped_by = "target_width"
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return PairResult(names, times, time.perf_counter() - start, stopped_by, watch)


def cpu_identity() -> dict:
    """CPU model name, vendor, family / model / stepping and the vector ISA flags (from /proc/cpuinfo)."""
    fields = {"model name": "cpu", "vendor_id": "vendor", "cpu family": "family", "model": "model",
              "stepping": "stepping", "flags": "flags", "Features": "flags", "CPU implementer": "vendor",
              "CPU part": "model"}
    out: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                name = fields.get(key.strip())
                if name and name not in out:
                    out[name] = value.strip()
    except OSError:
        pass
    flags = set(out.pop("flags", "").split())
    wanted = ("sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "asimd", "sve")
    out["isa_flags"] = [f for f in wanted if f in flags]
    out.setdefault("cpu", platform.processor() or platform.machine())
    out["arch"] = platform.machine()
    return out


def cpu_line(info: dict) -> str:
    """One line naming the CPU: model, vendor family/model/stepping, the kernel's ISA."""
    ident = " ".join(f"{label} {info[k]}" for k, label in (("family", "family"), ("model_id", "model"),
                                                           ("stepping", "stepping")) if info.get(k) not in (None, ""))
    isa = info.get("mira_cpu_isa")
    chosen = f", MIRA CPU ISA {isa[0]}" if isa else ""
    return f"{info.get('cpu', '?')} ({info.get('vendor', '?')} {ident}; flags {' '.join(info.get('isa_flags', []))}" \
           f"{chosen})"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, threads, library versions, load."""
    ident = cpu_identity()
    info = {
        "cpu": ident["cpu"],
        "vendor": ident.get("vendor", ""),
        "family": ident.get("family", ""),
        "model_id": ident.get("model", ""),
        "stepping": ident.get("stepping", ""),
        "isa_flags": ident["isa_flags"],
        "arch": ident["arch"],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:  # which instruction-set variant the MIRA CPU kernel runs, when it is built
        import mira_kernels  # noqa: F401  (loads the extension)

        info["mira_cpu_isa"] = list(torch.ops.mira._cpu_isa_info())
    except (ImportError, AttributeError, RuntimeError):
        pass
    return info
