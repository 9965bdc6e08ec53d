"""Where one MIRA projection's time goes, and the floor it cannot go below, on this machine.

``python -m benchmarks.budget`` builds ViT-B/16 with MIRA in the published configuration (as
``benchmarks.latency`` does), takes block 0's projection and its real input, and measures:

**The floor per block** = max(extra multiply-adds at the measured GEMM rate, memory bytes read per
call at the measured DRAM bandwidth), x the adapted blocks, over the backbone's median time. The
GEMM rate is the stock qkv ``nn.Linear``'s own at the real shape (cold caches, as in the network);
the bandwidth is that of the cold-cache eviction reads made in the same timed rounds (a read of
twice the last-level cache before each call; with warm caches, a read of four times it at the
start): on a shared host the bandwidth drifts, and the floor should see what the timed calls
saw. The bytes are the banks
(N*S*r*(d_in+d_s) elements) and the keys (N*d_k): every call reads them, and in a network they
come back from DRAM (the rest of the model streams ~350 MB of weights between two calls of a
block).

**The time budget per block**, each part in microseconds, every call timed with cold caches (a
read of a buffer twice the last-level cache evicts everything, then the input is rewritten, as the
LayerNorm before the projection leaves it hot), all variants interleaved per round:

- Python layer and call: the time the module's call spends outside the kernel's phases (read from
  the phase clock, ``torch.ops.mira._cpu_last_phases``: the Python frames, the eval plan, the
  binding's argument parsing, the output's wrapping and release) less the same for the stock
  ``nn.Linear``: its wall time less the empty-memory op's bias copy and GEMM phases (the same two
  steps addmm runs). Of which, timed alone: with an eval plan (``MiraProjection``'s prepared call,
  ``csrc/eval_plan.cpp``, made on the first eval call), the plan's checks (``plan.check(x)``:
  guards and stamps; it replays the query and the key prep); without one, the query
  (``memory.query_token(x)``, whose token index the eval fast path selects in C++, else
  ``memory.make_query(x)``) and the key prep (``memory.retrieval_tensors()``, cached in eval);
- the kernel's phases of the module's call: entry (checks, allocation), retrieval, mixing;
- shrink/expand: the module's seeding pass over the same call's with an empty memory (bias only);
- the GEMM phase over the empty-memory op's (the same GEMM: its noise).

Each part is a per-round difference, so the parts add up to the module over ``nn.Linear`` round by
round (their medians nearly). Until 2026-12-05 the call's part was taken over ``F.linear``'s cold
call at a 1 x 1 x d_in input, which costs far more than the stock Linear's call outside its bias copy
and GEMM (85 against ~30 us on Zen 4): that made this part negative and left ~35-50 us in a
"residual" that was in fact the call path (measured with timestamps in the binding: the Python
frames and the plan 14, argument parsing 9, the GIL, record-function, wrapping and return ~12 us).

Prints a table (and ``--json PATH`` writes the record); writes nothing else.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import mira
import mira_kernels as mk
from benchmarks import _cli, _pairs
from mira_kernels.ops import eval_linear_cpu

__all__ = ["ColdCache", "dram_read_bandwidth", "measure_floor", "time_budget", "main"]


class ColdCache:
    """The cache state a projection meets inside a network, recreated before each timed call.

    Between two calls of one block's qkv projection the rest of the model streams ~350 MB of
    weights through the caches, and the LayerNorm just before the call writes its input. So before
    each call: read a buffer twice the last-level cache (clean lines: no write-backs land in the
    timed call), then run ``refresh`` (the block's LayerNorm over its input), which also warms the
    interpreter's module-call path as the preceding modules do. ``evict=False`` keeps the caches
    warm (the refresh still runs), for comparison.
    """

    def __init__(self, refresh: Callable[[], torch.Tensor], *, evict: bool = True) -> None:
        self.refresh = refresh
        self.evict = evict
        self._buffer = torch.ones(2 * last_level_cache_bytes() // 4, dtype=torch.float32) if evict else None
        self.read_seconds: list[float] = []  # each eviction read's wall time (read_bandwidth)
        self.x = refresh()

    def prepare(self) -> None:
        if self._buffer is not None:
            t0 = time.perf_counter()
            self._buffer.sum()
            self.read_seconds.append(time.perf_counter() - t0)
        self.x = self.refresh()

    def read_bandwidth(self) -> dict | None:
        """DRAM read bandwidth from the eviction reads made so far, in :func:`dram_read_bandwidth`'s
        record form, or None without them.

        Each read is of a buffer twice the last-level cache, made in the same rounds as the timed
        calls: on a shared host, whose bandwidth drifts with the neighbours' load (one 2-core
        Xeon VM read 13 to 33 GB/s within an hour), the floor then sees the bandwidth the timed
        calls saw, not a sample taken minutes before them.
        """
        if self._buffer is None or len(self.read_seconds) < 3:
            return None
        med, lo, hi = _pairs.median_ci(self.read_seconds)
        n = self._buffer.numel() * 4
        # Unbounded time bounds (too few reads for 95%) give bandwidth bounds 0 and inf.
        return {"bytes_per_s": n / med, "lo": n / hi, "hi": n / lo if lo > 0 else math.inf, "buffer_bytes": n,
                "threads": torch.get_num_threads(), "reads": len(self.read_seconds),
                "source": "the eviction reads of the timed rounds"}

    def timer(self, fn: Callable[[], object]) -> float:
        self.prepare()
        return _pairs.wall_timer(fn)


def last_level_cache_bytes() -> int:
    """Size of the largest cache (sysfs first: under KVM, glibc's sysconf can report a bogus L3)."""
    import glob
    import os

    sizes = []
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            text = Path(d, "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    if sizes:
        return max(sizes)
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if v and v > 0:
            return int(v)
    return 64 << 20


def dram_read_bandwidth(*, mib: int = 512, repeats: int = 9) -> dict:
    """Bytes per second of a ``torch.sum`` over a buffer far larger than the caches (all threads).

    The buffer is ``mib`` MiB or four times the last-level cache, whichever is larger: a 256 MiB
    buffer on a Xeon with a 300 MiB L3 is read partly from the L3 and overstates the bandwidth.
    """
    buf = torch.ones(max(mib << 20, 4 * last_level_cache_bytes()) // 4, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    med, lo, hi = _pairs.median_ci(times)
    n = buf.numel() * 4
    # Unbounded time bounds (fewer than 6 reads: no 95% interval) give bandwidth bounds 0 and inf, not
    # n / -inf = -0.0 (every make bench record had "hi": -0.0 from its 5 reads).
    return {"bytes_per_s": n / med, "lo": n / hi, "hi": n / lo if lo > 0 else math.inf, "buffer_bytes": n,
            "threads": torch.get_num_threads()}


def memory_bytes(memory) -> dict:
    """Bytes of the banks and keys one call reads."""
    bank_a, bank_b = memory.retrieval_banks()
    keys = memory.retrieval_keys()
    banks = bank_a.numel() * bank_a.element_size() + bank_b.numel() * bank_b.element_size()
    return {"banks": int(banks), "keys": int(keys.numel() * keys.element_size())}


def measure_floor(proj, x: torch.Tensor, *, n_blocks: int, backbone_s: float, stock_s: float,
                  bandwidth: dict) -> dict:
    """The per-block floor and its share of the backbone (see the module docstring).

    ``stock_s``: the stock projection's median time at ``x``'s shape (cold caches), which gives the
    GEMM rate; ``bandwidth``: :func:`dram_read_bandwidth`'s record.
    """
    from benchmarks.latency import mira_extra_macs

    c = proj.memory.config
    base = proj.base_layer
    B, T, d_in = x.shape
    slots = int(proj.memory.retrieval_keys().shape[0])
    base_macs = B * T * d_in * base.out_features
    rate = base_macs / stock_s
    extra = B * mira_extra_macs(tokens=T, d_in=d_in, d_s=c.slice_width, d_k=c.d_k, slices=c.num_slices, rank=c.rank,
                                slots=slots)
    nbytes = memory_bytes(proj.memory)
    compute_s = extra / rate
    memory_s = (nbytes["banks"] + nbytes["keys"]) / bandwidth["bytes_per_s"]
    per_block = max(compute_s, memory_s)
    # The floor above presumes the bank stream overlaps the arithmetic. On the 2-core machines measured
    # so far, where both cores do both, every overlap tried measured no gain (csrc/cpu/
    # mira_linear_cpu.cpp), so the sum is printed beside it: what the kernel's phases approach.
    serial = compute_s + memory_s
    return {
        "gemm_macs_per_s": rate, "extra_macs": int(extra), "compute_s": compute_s,
        "bytes": nbytes, "dram_bytes_per_s": bandwidth["bytes_per_s"], "bandwidth_source": bandwidth.get("source"),
        "memory_s": memory_s,
        "per_block_s": per_block, "bound": "memory" if memory_s >= compute_s else "compute",
        "percent": 100.0 * n_blocks * per_block / backbone_s,
        "serial_s": serial, "serial_percent": 100.0 * n_blocks * serial / backbone_s,
    }


def _diff_stats(a: Sequence[float], b: Sequence[float] | None = None) -> dict:
    """Median of per-round a (or a - b) with its 95% interval, seconds."""
    v = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    med, lo, hi = _pairs.median_ci(v)
    return {"median_s": med, "lo_s": lo, "hi_s": hi}


PHASES = ("entry", "retrieval", "mixing", "seeding", "gemm")


def time_budget(proj, cache: ColdCache, *, budget_s: float = 20.0, seed: int = 0) -> dict:
    """Interleaved rounds of the projection, its parts and the stock Linear, each call after
    ``cache.prepare()`` (its input is ``cache.x``), with the CPU kernel's phase clock on.

    Returns per-part medians (seconds) with 95% intervals, and the rounds' raw totals.
    """
    x = cache.x
    if x.device.type != "cpu":
        raise ValueError("the time budget reads the CPU kernel's phase clock: CPU tensors only")
    memory = proj.memory
    c = memory.config
    base = proj.base_layer
    w, b = base.weight, base.bias
    offsets = tuple(proj.slice_offsets)
    last = torch.ops.mira._cpu_last_phases
    phases: dict[str, list[list[float]]] = {"module": [], "empty": []}
    with torch.inference_mode():
        for _ in range(2):  # as in a network after its first call: with an eval plan where one applies
            proj(cache.x)
        plan = proj.__dict__.get("_eval_plan")
        planned = plan is not None and not plan.stale
        keys, bank_a, bank_b = memory.retrieval_tensors()
        empty = (keys[:0], bank_a[:0], bank_b[:0])
        query = memory.make_query(x)

        def module() -> None:
            proj(cache.x)

        def empty_op() -> None:  # the same call with an empty memory: the bias-only seeding pass
            if eval_linear_cpu(cache.x, w, b, query, *empty, offsets, c.separation, c.scale, c.eps) is None:
                mk.mira_linear(cache.x, w, b, query, *empty, slice_offsets=offsets, separation=c.separation,
                               scale=c.scale, eps=c.eps)

        # The phase clock is read after the timed call, not inside it: read cold, the op call that
        # returns it cost tens of microseconds, which the call's part used to include.
        readouts = {module: "module", empty_op: "empty"}

        def timer(fn) -> float:
            seconds = cache.timer(fn)
            if fn in readouts:
                phases[readouts[fn]].append(list(last()))
            return seconds

        def query_part() -> object:  # as the module makes it
            token = memory.query_token(cache.x)
            return token if token is not None else memory.make_query(cache.x)

        fns = {
            "stock": lambda: base(cache.x),
            "module": module,
            "empty_op": empty_op,
        }
        if planned:
            fns["plan_checks"] = lambda: plan.check(cache.x)
        else:
            fns["query"], fns["key_prep"] = query_part, memory.retrieval_tensors
        torch.ops.mira._cpu_phase_clock(True)
        try:
            rounds = _pairs.time_interleaved(fns, watch=[("module", "stock")], target_width=None, budget_s=budget_s,
                                             min_rounds=20, check_every=20, warmup=3, timer=timer, seed=seed)
        finally:
            torch.ops.mira._cpu_phase_clock(False)
    t = {k: np.asarray(v) for k, v in rounds.times.items()}
    mp = np.asarray(phases["module"][-rounds.rounds:]).T
    ep = np.asarray(phases["empty"][-rounds.rounds:]).T
    mph, eph = dict(zip(PHASES, mp)), dict(zip(PHASES, ep))
    # Outside the kernel's phases, the module's call over the stock Linear's (its bias copy and
    # GEMM are the empty-memory op's seeding and GEMM phases).
    python = (t["module"] - mp.sum(axis=0)) - (t["stock"] - eph["seeding"] - eph["gemm"])
    within = ({"plan_checks": _diff_stats(t["plan_checks"])} if planned else
              {"query_module": _diff_stats(t["query"]), "key_prep": _diff_stats(t["key_prep"])})
    parts = {
        "python_layer": _diff_stats(python),
        **within,
        "op_entry": _diff_stats(mph["entry"]),
        "retrieval": _diff_stats(mph["retrieval"]),
        "mixing": _diff_stats(mph["mixing"]),
        "shrink_expand": _diff_stats(mph["seeding"], eph["seeding"]),
        "gemm": _diff_stats(mph["gemm"], eph["gemm"]),
    }
    total = _diff_stats(t["module"], t["stock"])
    return {
        "batch": int(x.shape[0]), "rounds": rounds.rounds, "seconds": rounds.seconds, "evict": cache.evict,
        "eval_plan": planned,
        "stock": _diff_stats(t["stock"]), "module": _diff_stats(t["module"]), "extra": total, "parts": parts,
        "phases_module_s": {k: float(np.median(v)) for k, v in mph.items()},
        "phases_empty_s": {k: float(np.median(v)) for k, v in eph.items()},
    }


def backbone_median(model: nn.Module, x: torch.Tensor, *, runs: int = 15) -> float:
    with torch.inference_mode():
        model(x)
        times = [_pairs.wall_timer(lambda: model(x)) for _ in range(runs)]
    return float(np.median(times))


PART_LABELS = {
    "python_layer": "Python layer and call (over nn.Linear's)",
    "plan_checks": "  of which: eval plan's checks (guards, stamps)",
    "query_module": "  of which: query (query_token / make_query)",
    "key_prep": "  of which: key prep (retrieval_tensors)",
    "op_entry": "op entry (C++ checks, allocation)",
    "retrieval": "retrieval (kernel: scores, separation)",
    "mixing": "mixing (kernel: A_b, B_b from the banks)",
    "shrink_expand": "shrink/expand (seeding pass over bias-only)",
    "gemm": "GEMM phase over the empty-memory op's (noise)",
}


def format_budget(rec: dict) -> str:
    m = rec["machine"]
    banks = rec.get("bank_dtype") or "model dtype"
    lines = [f"MIRA per-block time budget and floor: {rec['model']} fp32, r={rec['rank']} N={rec['slots']}, "
             f"banks {banks}, "
             f"block 0, {rec['n_blocks']} blocks; commit {rec['commit']}, {rec['timestamp']}",
             f"machine: {_pairs.cpu_line(m)}, {m.get('torch_threads')} threads, "
             f"load {m.get('load_average_1m', -1):.1f} at start; caches "
             f"{'evicted' if rec['batches'][0]['budget']['evict'] else 'warm'} before each call",
             f"DRAM read bandwidth at the start {rec['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s "
             f"({rec['bandwidth']['threads']} threads)", ""]
    for r in rec["batches"]:
        f, bud = r["floor"], r["budget"]
        us = 1e6
        lines.append(f"batch {r['batch']}: backbone median {1e3 * r['backbone_s']:.1f} ms; stock qkv "
                     f"{1e3 * bud['stock']['median_s']:.3f} ms (GEMM rate {f['gemm_macs_per_s'] / 1e9:.1f} GMAC/s)")
        lines.append(f"  floor per block: compute {us * f['compute_s']:.1f} us ({f['extra_macs'] / 1e6:.2f}M MACs), "
                     f"memory {us * f['memory_s']:.1f} us ({(f['bytes']['banks'] + f['bytes']['keys']) / 1e6:.2f} MB "
                     f"at {f['dram_bytes_per_s'] / 1e9:.1f} GB/s"
                     f"{', in the timed rounds' if f.get('bandwidth_source') else ''})"
                     f" -> {us * f['per_block_s']:.1f} us ({f['bound']}-bound), x{rec['n_blocks']} = "
                     f"{f['percent']:.3f}% of the backbone; without overlap (the sum) {us * f['serial_s']:.1f} us, "
                     f"{f['serial_percent']:.3f}%")
        scale = 100.0 * rec["n_blocks"] / r["backbone_s"]
        for key, label in PART_LABELS.items():
            if key not in bud["parts"]:
                continue  # the query and key prep where an eval plan replays them, or the plan's checks
            p = bud["parts"][key]
            ci = "" if not np.isfinite(p["lo_s"]) else f" [{us * p['lo_s']:.1f}, {us * p['hi_s']:.1f}]"
            lines.append(f"  {label:<44} {us * p['median_s']:8.1f} us{ci:<18} {scale * p['median_s']:+.3f}%")
        e = bud["extra"]
        lines.append(f"  {'=> module over nn.Linear':<44} {us * e['median_s']:8.1f} us "
                     f"[{us * e['lo_s']:.1f}, {us * e['hi_s']:.1f}]   {scale * e['median_s']:+.3f}% "
                     f"({bud['rounds']} rounds)")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import latency

    p = argparse.ArgumentParser(prog="python -m benchmarks.budget", description=__doc__.split("\n\n")[0],
                                formatter_class=_cli.HelpFormatter)
    p.add_argument("--batch-sizes", type=_cli.positive_int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--budget", type=_cli.non_negative_float, default=20.0,
                   help="seconds of interleaved rounds per batch size")
    p.add_argument("--threads", type=_cli.non_negative_int, default=0, help="torch threads (0: torch's own choice)")
    p.add_argument("--warm", action="store_true",
                   help="keep caches warm between calls instead of evicting them before each")
    p.add_argument("--bank-dtype", default="", choices=("", "bfloat16", "float16", "float32"),
                   help="storage dtype of MIRA's banks (mira.attach's bank_dtype; default: the model's dtype)")
    p.add_argument("--json", default=None, help="also write the record here")
    a = p.parse_args(argv)
    if problem := _cli.repeated_problem("--batch-sizes", a.batch_sizes):
        p.error(problem)  # a repeated batch size was measured twice
    if a.json and (problem := _cli.output_problem(a.json, folder=False)):
        p.error(f"--json: {problem}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = latency.BenchConfig(batch_sizes=tuple(a.batch_sizes), device="cpu", bank_dtype=a.bank_dtype)
    machine = _pairs.machine_info()
    variants = latency.build_variants(cfg)
    proj = mira.projections(variants.mira)[0]
    bandwidth = dram_read_bandwidth()
    norm1 = variants.mira.blocks[0].norm1
    batches = []
    for batch in a.batch_sizes:
        imgs = latency.images(variants, batch, cfg.seed)
        resid = latency.block_input(variants.mira, imgs, where="block")
        backbone_s = backbone_median(variants.backbone, imgs, runs=15 if batch == 1 else 5)
        with torch.inference_mode():
            cache = ColdCache(lambda r=resid: norm1(r), evict=not a.warm)
        bud = time_budget(proj, cache, budget_s=a.budget)
        floor = measure_floor(proj, cache.x, n_blocks=variants.n_blocks, backbone_s=backbone_s,
                              stock_s=bud["stock"]["median_s"], bandwidth=cache.read_bandwidth() or bandwidth)
        batches.append({"batch": batch, "backbone_s": backbone_s, "floor": floor, "budget": bud})
    rec = {"kind": "budget", "model": cfg.model, "rank": cfg.rank, "slots": cfg.slots,
           "bank_dtype": cfg.bank_dtype or None, "n_blocks": variants.n_blocks,
           "commit": latency.git_commit(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine, "bandwidth": bandwidth, "batches": batches}
    print(format_budget(rec))
    if a.json:
        with _cli.whole_or_not_at_all():
            Path(a.json).write_text(_pairs.record_json(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
