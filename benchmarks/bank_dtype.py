"""What 16-bit bank storage saves a user of ``mira.attach``: the projection with bf16 banks against
the same projection with float32 banks and the stock ``nn.Linear``, interleaved in one process.

``python -m benchmarks.bank_dtype`` builds ViT-B/16 with MIRA in the published configuration (as
``benchmarks.latency`` does; float32 banks), and beside block 0's MIRA projection a twin that
shares its base layer and holds the same memory with its banks stored as ``--bank-dtype``
(``mira.attach(..., bank_dtype=...)``; the entries rounded once). Per batch size, rounds of
three calls in random order, each with the caches as a network leaves them (``budget.ColdCache``):
the stock Linear, the MIRA projection, its twin. It prints, as ``benchmarks.latency`` does at
module level, each projection's extra time over the stock Linear ((median per-round ratio - 1) x
the Linear's median, 95% interval) x the adapted blocks over the backbone's median, and
the paired difference twin - MIRA per block (median of per-round differences, 95%
interval); and the floor per block of each (``budget.measure_floor``:
bank and key bytes at the DRAM bandwidth of the rounds' own cache-evicting reads, as ``budget`` and
``latency`` read it, against the extra multiply-adds at the stock GEMM's rate). Records the machine
(vendor, family, model, stepping, the kernel's ISA) and commit.
Writes nothing unless ``--json PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import mira
from benchmarks import _cli, _pairs
from benchmarks.budget import ColdCache, backbone_median, dram_read_bandwidth, measure_floor
from mira.layers import MiraProjection
from mira.memory import AdapterMemory

__all__ = ["twin_projection", "compare", "main"]


def twin_projection(proj: MiraProjection, bank_dtype: str) -> MiraProjection:
    """``proj`` with its memory's banks stored as ``bank_dtype`` (same base layer, keys, query)."""
    base = proj.base_layer
    config = dataclasses.replace(proj.memory.config, bank_dtype=bank_dtype)
    memory = AdapterMemory(config, device=base.weight.device, dtype=base.weight.dtype)
    memory.load_state_dict(proj.memory.state_dict())  # the banks rounded into bank_dtype
    twin = MiraProjection(base, memory, proj.slice_offsets, slice_names=proj.slice_names)
    twin.set_stage(proj.stage)
    return twin.eval().requires_grad_(False)


def _diff(a: Sequence[float], b: Sequence[float]) -> dict:
    med, lo, hi = _pairs.median_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    return {"median_s": med, "lo_s": lo, "hi_s": hi}


def compare(proj: MiraProjection, twin: MiraProjection, cache: ColdCache, *, budget_s: float, seed: int) -> dict:
    """Interleaved cold-cache rounds of the stock Linear, ``proj`` and ``twin`` (seconds per call)."""
    with torch.inference_mode():
        want = proj(cache.x)
        got = twin(cache.x)
        ok = bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
        if not ok:
            raise AssertionError("the bf16-bank twin's output is not within its storage bound of the projection's")
        result = _pairs.time_interleaved(
            {"stock": lambda: proj.base_layer(cache.x), "mira": lambda: proj(cache.x),
             "twin": lambda: twin(cache.x)},
            watch=[("twin", "mira")], target_width=0.0, budget_s=budget_s, min_rounds=20, check_every=20,
            warmup=3, timer=cache.timer, seed=seed)
    t = result.times
    stock = result.median("stock")

    def extra(name: str) -> dict:  # as benchmarks.latency's module level: (median ratio - 1) x stock median
        r = result.ratio(name, "stock")
        return {"median_s": (r["ratio"] - 1) * stock["seconds"], "lo_s": (r["lo"] - 1) * stock["seconds"],
                "hi_s": (r["hi"] - 1) * stock["seconds"], "ratio": r}

    return {"rounds": result.rounds, "seconds": result.seconds, "stock": stock, "mira": result.median("mira"),
            "twin": result.median("twin"), "mira_extra": extra("mira"), "twin_extra": extra("twin"),
            "twin_minus_mira": _diff(t["twin"], t["mira"])}


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import latency

    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_dtype", description=__doc__.split("\n\n")[0],
                                formatter_class=_cli.HelpFormatter)
    p.add_argument("--batch-sizes", type=_cli.positive_int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--budget", type=_cli.non_negative_float, default=60.0,
                   help="seconds of interleaved rounds per batch size")
    p.add_argument("--bank-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="storage dtype of the twin's banks")
    p.add_argument("--threads", type=_cli.non_negative_int, default=0, help="torch threads (0: torch's own choice)")
    p.add_argument("--json", default=None, help="also write the record here")
    a = p.parse_args(argv)
    if problem := _cli.repeated_problem("--batch-sizes", a.batch_sizes):
        p.error(problem)  # a repeated batch size was measured twice
    if a.json and (problem := _cli.output_problem(a.json, folder=False)):
        p.error(f"--json: {problem}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = latency.BenchConfig(batch_sizes=tuple(a.batch_sizes), device="cpu")
    machine = _pairs.machine_info()
    variants = latency.build_variants(cfg)
    proj = mira.projections(variants.mira)[0]
    twin = twin_projection(proj, a.bank_dtype)
    bandwidth = dram_read_bandwidth()
    norm1 = variants.mira.blocks[0].norm1
    n = variants.n_blocks
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"# {_pairs.cpu_line(machine)}; commit {latency.git_commit()}, {started}; {torch.get_num_threads()} "
          f"threads; DRAM read {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s")
    batches = []
    for batch in a.batch_sizes:
        imgs = latency.images(variants, batch, cfg.seed)
        resid = latency.block_input(variants.mira, imgs, where="block")
        backbone_s = backbone_median(variants.backbone, imgs, runs=15 if batch == 1 else 5)
        with torch.inference_mode():
            cache = ColdCache(lambda r=resid: norm1(r))
        res = compare(proj, twin, cache, budget_s=a.budget, seed=cfg.seed + batch)
        stock_s = res["stock"]["seconds"]
        floors = {name: measure_floor(m, cache.x, n_blocks=n, backbone_s=backbone_s, stock_s=stock_s,
                                      bandwidth=cache.read_bandwidth() or bandwidth)
                  for name, m in (("float32", proj), (a.bank_dtype, twin))}
        pct = 100.0 * n / backbone_s
        print(f"B={batch}: backbone {backbone_s * 1e3:.1f} ms, {res['rounds']} rounds; module level over nn.Linear, "
              f"x{n} / backbone:")
        for label, key in (("float32 banks", "mira_extra"), (f"{a.bank_dtype} banks", "twin_extra")):
            d = res[key]
            print(f"  {label:16s} {pct * d['median_s']:+.3f}% [{pct * d['lo_s']:+.3f}, {pct * d['hi_s']:+.3f}]  "
                  f"({d['median_s'] * 1e6:.0f} us per block)")
        d = res["twin_minus_mira"]
        print(f"  {a.bank_dtype} - float32 per block: {d['median_s'] * 1e6:+.1f} us [{d['lo_s'] * 1e6:+.1f}, "
              f"{d['hi_s'] * 1e6:+.1f}] = {pct * d['median_s']:+.3f} pp")
        for name, f in floors.items():
            print(f"  floor, {name} banks: {f['percent']:.3f}% ({f['bound']}-bound: {f['memory_s'] * 1e6:.1f} us for "
                  f"{(f['bytes']['banks'] + f['bytes']['keys']) / 1e6:.2f} MB, {f['compute_s'] * 1e6:.1f} us for "
                  f"{f['extra_macs'] / 1e6:.2f}M MACs)")
        batches.append({"batch": batch, "backbone_s": backbone_s, "pairs": res, "floors": floors})
    if a.json:
        rec = {"kind": "bank_dtype", "bank_dtype": a.bank_dtype, "model": cfg.model, "commit": latency.git_commit(),
               "timestamp": started, "machine": machine,
               "bandwidth": bandwidth, "batches": batches}
        with _cli.whole_or_not_at_all():
            Path(a.json).write_text(_pairs.record_json(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
