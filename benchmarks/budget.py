"""Where one MIRA projection's time goes, and the floor it cannot go below, on this machine.

``python -m benchmarks.budget`` builds ViT-B/16 with MIRA in the published configuration (as
``benchmarks.latency`` does), takes block 0's projection and its real input, and measures:

**The floor per block** = max(extra multiply-adds at the measured GEMM rate, memory bytes read per
call at the measured DRAM bandwidth), x the adapted blocks, over the backbone's median time. The
GEMM rate is the stock qkv ``nn.Linear``'s own at the real shape (cold caches, as in the network);
the bandwidth is a 2-thread read of a buffer far larger than the caches. The bytes are the banks
(N*S*r*(d_in+d_s) elements) and the keys (N*d_k): every call reads them, and in a network they
come back from DRAM (the rest of the model streams ~350 MB of weights between two calls of a
block).

**The time budget per block**, each part in microseconds, every call timed with cold caches (a
read of a buffer twice the last-level cache evicts everything, then the input is rewritten, as the
LayerNorm before the projection leaves it hot), all variants interleaved per round:

- query module: ``memory.make_query(x)`` (pooling, cast, query module);
- key prep: ``memory.retrieval_keys()`` and ``retrieval_banks()`` (masking, normalisation);
- op call cost: the public op with an empty memory over ``nn.Linear`` at the real shape (at B=1
  the empty op is ATen's addmm itself, so this is the wrapper, dispatch and C++ checks), plus the
  extra C++ entry time (checks of the memory tensors, allocation) of the fused call;
- retrieval and mixing: the CPU kernel's phase clock (``torch.ops.mira._cpu_forward_phases``);
- shrink/expand: the fused call's seeding pass + GEMM over the empty call's addmm;
- Python layer (residual): the projection module over ``nn.Linear``, less all of the above.

Prints a table (and ``--json PATH`` writes the record); writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import mira
import mira_kernels as mk
from benchmarks import _pairs

__all__ = ["ColdCache", "dram_read_bandwidth", "measure_floor", "time_budget", "main"]


class ColdCache:
    """Before each timed call: evict the caches, then make the call's input hot again.

    Eviction reads a buffer of ``2 x`` the last-level cache (clean lines, so no write-backs land in
    the timed call); ``refresh`` then rewrites the input from a cold copy, as the LayerNorm that
    precedes a qkv projection leaves its output in cache.
    """

    def __init__(self, llc_bytes: int | None = None) -> None:
        llc = llc_bytes or _last_level_cache_bytes()
        self._evict = torch.ones(2 * llc // 4, dtype=torch.float32)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hot(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` that is rewritten (hot) before every timed call."""
        buf = x.clone()
        self._pairs.append((buf, x.clone()))
        return buf

    def prepare(self) -> None:
        self._evict.sum()
        for buf, src in self._pairs:
            buf.copy_(src)

    def timer(self, fn: Callable[[], object]) -> float:
        self.prepare()
        return _pairs.wall_timer(fn)


def _last_level_cache_bytes() -> int:
    import os

    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if v and v > 0:
            return int(v)
    return 64 << 20


def dram_read_bandwidth(*, mib: int = 512, repeats: int = 9) -> dict:
    """Bytes per second of a ``torch.sum`` over a buffer far larger than the caches (all threads)."""
    buf = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    med, lo, hi = _pairs.median_ci(times)
    n = buf.numel() * 4
    return {"bytes_per_s": n / med, "lo": n / hi, "hi": n / lo, "buffer_bytes": n, "threads": torch.get_num_threads()}


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
    return {
        "gemm_macs_per_s": rate, "extra_macs": int(extra), "compute_s": compute_s,
        "bytes": nbytes, "dram_bytes_per_s": bandwidth["bytes_per_s"], "memory_s": memory_s,
        "per_block_s": per_block, "bound": "memory" if memory_s >= compute_s else "compute",
        "percent": 100.0 * n_blocks * per_block / backbone_s,
    }


def _diff_stats(a: Sequence[float], b: Sequence[float] | None = None) -> dict:
    """Median of per-round a (or a - b) with its bootstrap interval, seconds."""
    v = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    med, lo, hi = _pairs.median_ci(v)
    return {"median_s": med, "lo_s": lo, "hi_s": hi}


def time_budget(proj, x: torch.Tensor, *, budget_s: float = 20.0, seed: int = 0,
                cache: ColdCache | None = None) -> dict:
    """Interleaved, cold-cache rounds of the projection, its parts and the stock Linear.

    Returns per-part medians (seconds) with bootstrap intervals, and the rounds' raw totals.
    """
    if x.device.type != "cpu":
        raise ValueError("the time budget reads the CPU kernel's phase clock: CPU tensors only")
    cache = cache or ColdCache()
    memory = proj.memory
    c = memory.config
    base = proj.base_layer
    w, b = base.weight, base.bias
    xh = cache.hot(x)
    opts = {"slice_offsets": list(proj.slice_offsets), "separation": c.separation, "scale": c.scale, "eps": c.eps}
    with torch.inference_mode():
        query = memory.make_query(x)
        keys = memory.retrieval_keys()
        bank_a, bank_b = memory.retrieval_banks()
        empty = (keys[:0], bank_a[:0], bank_b[:0])
        phases: dict[str, list[list[float]]] = {"fused": [], "empty": []}
        raw = torch.ops.mira._cpu_forward_phases
        args = (list(proj.slice_offsets), c.separation, float(c.scale), float(c.eps))

        def fused_phases() -> None:
            phases["fused"].append(list(raw(xh, w, b, query, keys, bank_a, bank_b, *args)[1]))

        def empty_phases() -> None:
            phases["empty"].append(list(raw(xh, w, b, query, *empty, *args)[1]))

        def key_prep() -> None:
            memory.retrieval_keys()
            memory.retrieval_banks()

        fns = {
            "stock": lambda: base(xh),
            "module": lambda: proj(xh),
            "query": lambda: memory.make_query(xh),
            "key_prep": key_prep,
            "empty_op": lambda: mk.mira_linear(xh, w, b, query, *empty, **opts),
            "fused_phases": fused_phases,
            "empty_phases": empty_phases,
        }
        rounds = _pairs.time_interleaved(fns, watch=[("module", "stock")], target_width=None, budget_s=budget_s,
                                         min_rounds=20, check_every=20, warmup=3, timer=cache.timer, seed=seed)
    t = rounds.times
    fp = np.asarray(phases["fused"][-rounds.rounds:])
    ep = np.asarray(phases["empty"][-rounds.rounds:])
    entry, retrieval, mixing, seeding, gemm = fp.T
    e_entry, _, _, e_seed, e_gemm = ep.T
    parts = {
        "query_module": _diff_stats(t["query"]),
        "key_prep": _diff_stats(t["key_prep"]),
        "op_call": _diff_stats(np.asarray(t["empty_op"]) - np.asarray(t["stock"]) + (entry - e_entry)),
        "retrieval": _diff_stats(retrieval),
        "mixing": _diff_stats(mixing),
        "shrink_expand": _diff_stats(seeding + gemm, e_seed + e_gemm),
    }
    total = _diff_stats(t["module"], t["stock"])
    accounted = sum(p["median_s"] for p in parts.values())
    parts["python_layer"] = {"median_s": total["median_s"] - accounted, "lo_s": float("nan"), "hi_s": float("nan"),
                             "note": "residual: module over nn.Linear less the parts above"}
    return {
        "batch": int(x.shape[0]), "rounds": rounds.rounds, "seconds": rounds.seconds,
        "stock": _diff_stats(t["stock"]), "module": _diff_stats(t["module"]), "extra": total, "parts": parts,
        "phases_fused_s": {k: float(np.median(v)) for k, v in zip(("entry", "retrieval", "mixing", "seeding", "gemm"),
                                                                   fp.T)},
        "phases_empty_s": {k: float(np.median(v)) for k, v in zip(("entry", "retrieval", "mixing", "seeding", "gemm"),
                                                                   ep.T)},
    }


def backbone_median(model: nn.Module, x: torch.Tensor, *, runs: int = 15) -> float:
    with torch.inference_mode():
        model(x)
        times = [_pairs.wall_timer(lambda: model(x)) for _ in range(runs)]
    return float(np.median(times))


PART_LABELS = {
    "query_module": "query module (make_query)",
    "key_prep": "key prep (retrieval_keys/banks)",
    "op_call": "op call cost (wrapper, dispatch, checks)",
    "retrieval": "retrieval (kernel: scores, separation)",
    "mixing": "mixing (kernel: A_b, B_b from the banks)",
    "shrink_expand": "shrink/expand (seeding + GEMM over addmm)",
    "python_layer": "Python layer and the rest (residual)",
}


def format_budget(rec: dict) -> str:
    m = rec["machine"]
    lines = [f"MIRA per-block time budget and floor: {rec['model']} fp32, r={rec['rank']} N={rec['slots']}, "
             f"block 0, {rec['n_blocks']} blocks; commit {rec['commit']}, {rec['timestamp']}",
             f"machine: {m.get('cpu')}, {m.get('torch_threads')} threads, ISA {m.get('mira_cpu_isa')}, "
             f"load {m.get('load_average_1m', -1):.1f} at start",
             f"DRAM read bandwidth {rec['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s "
             f"({rec['bandwidth']['threads']} threads)", ""]
    for r in rec["batches"]:
        f, bud = r["floor"], r["budget"]
        us = 1e6
        lines.append(f"batch {r['batch']}: backbone median {1e3 * r['backbone_s']:.1f} ms; stock qkv "
                     f"{1e3 * bud['stock']['median_s']:.3f} ms (GEMM rate {f['gemm_macs_per_s'] / 1e9:.1f} GMAC/s)")
        lines.append(f"  floor per block: compute {us * f['compute_s']:.1f} us ({f['extra_macs'] / 1e6:.2f}M MACs), "
                     f"memory {us * f['memory_s']:.1f} us ({(f['bytes']['banks'] + f['bytes']['keys']) / 1e6:.2f} MB)"
                     f" -> {us * f['per_block_s']:.1f} us ({f['bound']}-bound), x{rec['n_blocks']} = "
                     f"{f['percent']:.3f}% of the backbone")
        scale = 100.0 * rec["n_blocks"] / r["backbone_s"]
        for key, label in PART_LABELS.items():
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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget", type=float, default=20.0, help="seconds of interleaved rounds per batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own choice)")
    p.add_argument("--json", default=None, help="also write the record here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = latency.BenchConfig(batch_sizes=tuple(a.batch_sizes), device="cpu")
    machine = _pairs.machine_info()
    variants = latency.build_variants(cfg)
    proj = mira.projections(variants.mira)[0]
    bandwidth = dram_read_bandwidth()
    cache = ColdCache()
    batches = []
    for batch in a.batch_sizes:
        imgs = latency.images(variants, batch, cfg.seed)
        x = latency.block_input(variants.mira, imgs)
        backbone_s = backbone_median(variants.backbone, imgs, runs=15 if batch == 1 else 5)
        bud = time_budget(proj, x, budget_s=a.budget, cache=cache)
        floor = measure_floor(proj, x, n_blocks=variants.n_blocks, backbone_s=backbone_s,
                              stock_s=bud["stock"]["median_s"], bandwidth=bandwidth)
        batches.append({"batch": batch, "backbone_s": backbone_s, "floor": floor, "budget": bud})
    rec = {"kind": "budget", "model": cfg.model, "rank": cfg.rank, "slots": cfg.slots, "n_blocks": variants.n_blocks,
           "commit": latency.git_commit(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine, "bandwidth": bandwidth, "batches": batches}
    print(format_budget(rec))
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
