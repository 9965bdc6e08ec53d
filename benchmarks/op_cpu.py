"""Op-level CPU benchmark of ``mira_linear`` at ViT-B/16 qkv shapes (issue 3). Not a test.

    python -m benchmarks.op_cpu                 # full run, ~6-8 min on 2 busy cores (written to .bench/)
    python -m benchmarks.op_cpu --record        # the same, written to benchmarks/results/
    python -m benchmarks.op_cpu --quick         # smoke run: tiny budgets, numbers not meaningful, never written

Shapes: T=197 tokens, d_in=768 -> d_out=2304 (packed qkv), rank r=4, N=30 slots, S=2 slices (Q at
offset 0, V at 1536), query = the CLS token (MIRA's identity query), fp32, batch B in {1, 8, 32},
torch's default threads. Everything is checked against the float64 reference before it is timed.

What is reported (all as median per-round ratios with distribution-free 95% intervals, from interleaved
rounds, see benchmarks/_pairs.py):
  * forward, ``mira_linear`` (public op, CPU backend) over (a) the same base-GEMM path without the
    adapter (the op with an empty memory: the same seeding pass, bias only, and beta = 1 GEMM) and
    (b) the stock ``nn.Linear``; the raw private op too (no Python wrapper), and its store choice
    against ordinary stores;
  * the isolated ``mira_adapter_`` (a separate in-place pass), the paper-style eager implementation
    (benchmarks/eager_mira.py), a smart eager one (mixing GEMMs, bmm shrink, in-place baddbmm into
    the slices), and ``torch.compile`` of the reference;
  * a training step (forward + backward into x, query and keys; banks frozen) against the plain
    Linear's forward + backward (into x), for the kernel, the eager reference and the smart eager;
  * floors: the FLOP floor (extra multiply-adds at the Linear's own GEMM rate) and the memory floor
    of any separate adapter pass (re-read x, read-modify-write the slices, at measured bandwidth);
  * the GEMM facts behind the design: one Linear call vs per-sample addmm vs per-sample MKL-packed.

Results: op_cpu.md (latest run, table) and op_cpu.json (every run, appended) in a scratch folder (``.bench/``,
ignored by git), or with ``--record`` in benchmarks/results/, as ``benchmarks.latency`` does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mira_kernels as mk
from mira_kernels import reference

from . import _cli, _pairs, latency
from .eager_mira import EagerMiraLinear

T, D_IN, D_OUT, RANK, SLOTS, SLICES = 197, 768, 2304, 4, 30, 2
D_S = D_IN
OFFSETS = [0, 2 * D_IN]  # Q and V of a packed qkv
EPS = reference.DEFAULT_EPS
HEAD_MIN_ROUNDS = 400  # interleaved rounds of the headline ratios, whatever the stopping rule says
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# Inputs, baselines, floors.
# ----------------------------------------------------------------------------------------------


def make_case(batch: int, dtype=torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    lin = torch.nn.Linear(D_IN, D_OUT).to(dtype).requires_grad_(False)
    x = randn(batch, T, D_IN)
    return dict(
        lin=lin, x=x, weight=lin.weight, bias=lin.bias,
        keys=randn(SLOTS, D_IN), bank_a=randn(SLOTS, SLICES, RANK, D_IN, std=D_IN**-0.5),
        bank_b=randn(SLOTS, SLICES, D_S, RANK, std=0.02),
    )


def _args(c: dict, x: torch.Tensor, query: torch.Tensor, keys: torch.Tensor | None = None) -> tuple:
    return (x, c["weight"], c["bias"], query, c["keys"] if keys is None else keys, c["bank_a"], c["bank_b"])


def smart_eager(x, weight, bias, query, keys, bank_a, bank_b, *, slice_offsets, scale=1.0, eps=EPS):
    """A well-written eager adapter path: normalise, two mixing GEMMs, bmm shrink, in-place baddbmm expand."""
    b, _, d = x.shape
    n, s, r, _ = bank_a.shape
    d_s = bank_b.shape[2]
    w = reference.separate(F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T, "affine", eps)
    mixed_a = (w @ bank_a.reshape(n, -1)).view(b, s * r, d)
    mixed_b = (w @ bank_b.reshape(n, -1)).view(b, s, d_s, r)
    h = torch.bmm(x, mixed_a.transpose(1, 2))  # (B, T, S*r)
    y = F.linear(x, weight, bias)
    for i, off in enumerate(slice_offsets):
        y[:, :, off : off + d_s].baddbmm_(h[:, :, i * r : (i + 1) * r], mixed_b[:, i].transpose(1, 2), alpha=scale)
    return y


def forward_extra_macs(batch: int) -> int:
    """MIRA's multiply-adds beyond the base projection: scores, mixing, shrink, expand."""
    per_token = SLICES * RANK * (D_IN + D_S)
    mixing = SLOTS * SLICES * RANK * (D_IN + D_S)
    return batch * (T * per_token + mixing + SLOTS * D_IN)


def backward_extra_macs(batch: int) -> int:
    """Backward beyond G W: recomputed mixing and shrink, dh, dx's adapter part, dA, dB, dw."""
    sr = SLICES * RANK
    per_token = 3 * sr * D_IN + 2 * sr * D_S  # shrink again, dx part, dA; dh, dB
    mixing = 2 * SLOTS * SLICES * RANK * (D_IN + D_S)  # mixing again + dw
    return batch * (T * per_token + mixing + 2 * SLOTS * D_IN)


def measure_bandwidth(mib: int = 64, reps: int = 15) -> float:
    """Copy bandwidth in bytes/s (read + write) of a buffer far larger than the caches; median."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = [_pairs.wall_timer(lambda: dst.copy_(src)) for _ in range(reps)]
    return 2 * src.numel() * 4 / sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------
# Correctness before timing.
# ----------------------------------------------------------------------------------------------


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _check(name: str, got, want64, own, factor: float, checks: dict) -> None:
    own_err, err = _max_err(own, want64), _max_err(got, want64)
    floor = 1e-6 * max(1.0, float(want64.abs().max()))
    if not err <= factor * own_err + floor:
        raise AssertionError(f"{name}: error {err:.3g} vs float64 > {factor} x PyTorch's {own_err:.3g} + {floor:.1g}")
    checks[name] = {"error": err, "pytorch_error": own_err}


def check_correctness(c: dict, compiled) -> dict:
    """Every timed variant against the float64 reference (house criterion); raises on a miss."""
    checks: dict = {}
    c64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    x, x64 = c["x"], c64["x"]
    want = reference.mira_linear(*_args(c64, x64, x64[:, 0]), slice_offsets=OFFSETS)
    own = reference.mira_linear(*_args(c, x, x[:, 0]), slice_offsets=OFFSETS)
    with torch.no_grad(), mk.use_backend("cpu"):
        _check("mira_linear", mk.mira_linear(*_args(c, x, x[:, 0]), slice_offsets=OFFSETS), want, own, 2, checks)
        _check("_cpu_mira_linear", torch.ops.mira._cpu_mira_linear(*_args(c, x, x[:, 0]), OFFSETS, "affine", 1.0, EPS),
               want, own, 2, checks)
        out = c["lin"](x)
        mk.mira_adapter_(out, x, x[:, 0], c["keys"], c["bank_a"], c["bank_b"], slice_offsets=OFFSETS)
        _check("mira_adapter_", out, want, own, 2, checks)
        _check("smart_eager", smart_eager(*_args(c, x, x[:, 0]), slice_offsets=OFFSETS), want, own, 2, checks)
        paper = EagerMiraLinear(c["lin"], c["keys"], c["bank_a"], c["bank_b"], OFFSETS)
        _check("paper_eager", paper(x), want, own, 2, checks)
        _check("compiled_reference", compiled(x, x[:, 0]), want, own, 2, checks)
    # Gradients of the training step (x, query, keys), on the first sample only to keep it quick.
    grad64 = torch.randn(1, T, D_OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves64 = [x64[:1].clone().requires_grad_(), x64[:1, 0].clone().requires_grad_(),
                c64["keys"].clone().requires_grad_()]
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    y64 = reference.mira_linear(*_args(c64, *leaves64[:2], leaves64[2]), slice_offsets=OFFSETS)
    want_g = torch.autograd.grad(y64, leaves64, grad64)
    y32 = reference.mira_linear(*_args(c, *leaves[:2], leaves[2]), slice_offsets=OFFSETS)
    own_g = torch.autograd.grad(y32, leaves, grad64.float())
    with mk.use_backend("cpu"):
        got_g = torch.autograd.grad(mk.mira_linear(*_args(c, *leaves[:2], leaves[2]), slice_offsets=OFFSETS), leaves,
                                    grad64.float())
    for name, a, w, o in zip(("dx", "dquery", "dkeys"), got_g, want_g, own_g):
        _check(f"mira_linear {name}", a, w, o, 3, checks)
    return checks


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------


def gemm_paths(c: dict, budget: float) -> dict:
    """The design measurement: one Linear call vs per-sample GEMM calls (plain, MKL-packed)."""
    x, w, b = c["x"], c["weight"], c["bias"]
    batch = x.shape[0]
    out = torch.empty(batch, T, D_OUT)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, T)

    def per_sample_addmm():
        for i in range(batch):
            torch.addmm(b, x[i], w.t(), out=out[i])

    def per_sample_packed():
        for i in range(batch):
            torch.ops.mkl._mkl_linear(x[i], packed, w, b, T)

    with torch.inference_mode():
        res = _pairs.time_interleaved(
            {"linear": lambda: c["lin"](x), "per_sample_addmm": per_sample_addmm,
             "per_sample_mkl_packed": per_sample_packed},
            target_width=None, budget_s=budget, min_rounds=10,
        )
    return {k: res.ratio(k, "linear") for k in ("per_sample_addmm", "per_sample_mkl_packed")} | {
        "rounds": res.rounds}


def forward_timings(c: dict, compiled, budget: float, target: float, head_min_rounds: int = HEAD_MIN_ROUNDS) -> dict:
    x = c["x"]
    q = x[:, 0]
    x2d = x.view(-1, D_IN)
    lin, w, b = c["lin"], c["weight"], c["bias"]
    args = _args(c, x, q)
    out = lin(x)
    paper = EagerMiraLinear(lin, c["keys"], c["bank_a"], c["bank_b"], OFFSETS)
    # The same path without the adapter: the kernel with an empty memory (N = 0) seeds the output
    # with the bias only and runs the same GEMM; through the public wrapper ("base") and raw ("base_op").
    empty = (x, w, b, q, c["keys"][:0], c["bank_a"][:0], c["bank_b"][:0])
    fns_head = {  # few variants per round, so the headline intervals narrow fastest
        "base": lambda: mk.mira_linear(*empty, slice_offsets=OFFSETS),
        "linear": lambda: lin(x),
        "mira_linear": lambda: mk.mira_linear(*args, slice_offsets=OFFSETS),
    }
    def raw_op(stores: str):  # the kernel's store choice for its seeding pass (MIRA_CPU_STREAM)
        def run():
            os.environ["MIRA_CPU_STREAM"] = stores
            return torch.ops.mira._cpu_mira_linear(*args, OFFSETS, "affine", 1.0, EPS)
        return run

    fns_raw = {
        "linear": fns_head["linear"],
        "base_op": lambda: torch.ops.mira._cpu_mira_linear(*empty, OFFSETS, "affine", 1.0, EPS),
        "mira_op": raw_op("auto"),
        "mira_op_ordinary_stores": raw_op("0"),
        "aten_addmm": lambda: torch.addmm(b, x2d, w.t()).view(x.shape[0], T, D_OUT),
    }
    fns_cmp = {
        "linear": fns_head["linear"],
        "base": fns_head["base"],
        "mira_linear": fns_head["mira_linear"],
        "mira_adapter_": lambda: mk.mira_adapter_(out, x, q, c["keys"], c["bank_a"], c["bank_b"],
                                                  slice_offsets=OFFSETS),
        "smart_eager": lambda: smart_eager(*args, slice_offsets=OFFSETS),
        "paper_eager": lambda: paper(x),
        "compiled_reference": lambda: compiled(x, q),
    }
    with torch.inference_mode(), mk.use_backend("cpu"):
        # >= 400 pairs: their median's 95% interval is about +-0.3% here (issue 3).
        head = _pairs.time_interleaved(fns_head, watch=[("mira_linear", "base"), ("mira_linear", "linear")],
                                       target_width=target, budget_s=budget, min_rounds=head_min_rounds)
        try:
            raw = _pairs.time_interleaved(fns_raw, watch=[("mira_op", "base_op")], target_width=target,
                                          budget_s=budget / 3)
        finally:
            os.environ.pop("MIRA_CPU_STREAM", None)
        # The same headline pairs by process CPU time: on an oversubscribed machine wall time
        # mostly measures the scheduler, CPU time the work (see _pairs.process_timer).
        head_cpu = _pairs.time_interleaved(
            {k: fns_head[k] for k in ("base", "linear", "mira_linear")},
            watch=[("mira_linear", "base"), ("mira_linear", "linear")], target_width=target, budget_s=budget / 2,
            timer=_pairs.process_timer,
        )
        cmp_ = _pairs.time_interleaved(fns_cmp, watch=[("mira_linear", "base")], target_width=None,
                                       budget_s=budget / 2, min_rounds=10)
    res = {
        "head": head.summary() | {"ratios": {
            "mira_linear/base": head.ratio("mira_linear", "base"),
            "mira_linear/linear": head.ratio("mira_linear", "linear"),
            "base/linear": head.ratio("base", "linear"),
        }},
        "raw": raw.summary() | {"ratios": {
            "mira_op/base_op": raw.ratio("mira_op", "base_op"),
            "aten_addmm/linear": raw.ratio("aten_addmm", "linear"),
            "mira_op/mira_op_ordinary_stores": raw.ratio("mira_op", "mira_op_ordinary_stores"),
        }},
        # The kernel decides on its freshly allocated output, before writing it: ask about one.
        "streams": bool(torch.ops.mira._cpu_streams_into(torch.empty_like(out))),
        # Each implementation over its own base: the kernel over its N = 0 path, the eager and
        # compiled ones (which call nn.Linear / F.linear inside) over nn.Linear.
        "compare": cmp_.summary() | {"ratios": {
            "mira_linear/base": cmp_.ratio("mira_linear", "base"),
            **{f"{k}/linear": cmp_.ratio(k, "linear") for k in ("smart_eager", "paper_eager", "compiled_reference")},
        }},
        "linear_s": head.median("linear"),
        "mira_adapter_s": cmp_.median("mira_adapter_"),
        "mira_adapter_vs_linear": cmp_.ratio("mira_adapter_", "linear"),
        "head_cpu_time": head_cpu.summary() | {"ratios": {
            "mira_linear/base": head_cpu.ratio("mira_linear", "base"),
            "mira_linear/linear": head_cpu.ratio("mira_linear", "linear"),
            "base/linear": head_cpu.ratio("base", "linear"),
        }},
    }
    return res


def training_timings(c: dict, budget: float, target: float) -> dict:
    x0 = c["x"]
    grad = torch.randn(x0.shape[0], T, D_OUT, generator=torch.Generator().manual_seed(2))
    x = x0.clone().requires_grad_()
    q = x0[:, 0].clone().requires_grad_()
    keys = c["keys"].clone().requires_grad_()
    lin = c["lin"]

    def step_linear():
        return torch.autograd.grad(lin(x), [x], grad)

    def step(fn):
        def run():
            return torch.autograd.grad(fn(*_args(c, x, q, keys), slice_offsets=OFFSETS), [x, q, keys], grad)
        return run

    def step_base():  # the kernel with an empty memory: its own path without the adapter
        y = mk.mira_linear(x, c["weight"], c["bias"], q, keys[:0], c["bank_a"][:0], c["bank_b"][:0],
                           slice_offsets=OFFSETS)
        return torch.autograd.grad(y, [x], grad)

    fns = {"linear": step_linear, "base": step_base, "mira_linear": step(mk.mira_linear),
           "reference": step(reference.mira_linear), "smart_eager": step(smart_eager)}
    with mk.use_backend("cpu"):
        res = _pairs.time_interleaved(fns, watch=[("mira_linear", "linear")], target_width=target,
                                      budget_s=budget)
    return res.summary() | {"ratios": {**{f"{k}/linear": res.ratio(k, "linear") for k in fns if k != "linear"},
                                       "mira_linear/base": res.ratio("mira_linear", "base")},
                            "linear_s": res.median("linear")}


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def _pct(r: dict) -> str:
    return f"{100 * (r['ratio'] - 1):+.2f}% [{100 * (r['lo'] - 1):+.2f}, {100 * (r['hi'] - 1):+.2f}]"


def _times_cheaper(other: dict, mira: dict) -> str:
    ov_m, ov_o = mira["ratio"] - 1, other["ratio"] - 1
    return f"{ov_o / ov_m:.1f}x" if ov_m > 0 else "mira overhead <= 0"


def format_markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# mira_linear on CPU: op-level benchmark (ViT-B/16 qkv shapes)",
        "",
        f"Run {record['date']} (commit {record['commit']}): `{record['command']}`",
        f"Machine: {_pairs.cpu_line(m)}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}, torch "
        f"{m['torch']}, MKL {m['mkl']}, load average at start "
        f"{m.get('load_average_1m', float('nan')):.1f} (the 2 cores are shared with other jobs: noisy).",
        f"Shapes: T={T}, d_in={D_IN}, d_out={D_OUT}, r={RANK}, N={SLOTS}, S={SLICES} at offsets {OFFSETS}, fp32, "
        "query = CLS token. Ratios: median per-round ratio of interleaved rounds, [95% interval, order statistics].",
        f"Measured copy bandwidth: {record['bandwidth_GBps']:.1f} GB/s (read + write).",
        "",
        "## Forward (inference)",
        "",
        "| B | nn.Linear | FLOP floor | memory floor of a separate pass | mira_linear vs same base-GEMM path "
        "| mira_linear vs nn.Linear | raw op vs raw base | base path vs nn.Linear | ATen addmm vs nn.Linear "
        "| kernel's stores vs ordinary stores (raw op) | rounds (head / raw) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["batches"]:
        h = r["forward"]["head"]["ratios"]
        rw = r["forward"]["raw"]["ratios"]
        lines.append(
            f"| {r['batch']} | {1e3 * r['forward']['linear_s']['seconds']:.2f} ms | {r['floors']['flop_pct']:.2f}% | "
            f"{r['floors']['memory_pct']:.2f}% | {_pct(h['mira_linear/base'])} | {_pct(h['mira_linear/linear'])} | "
            f"{_pct(rw['mira_op/base_op'])} | {_pct(h['base/linear'])} | {_pct(rw['aten_addmm/linear'])} | "
            f"{'streaming' if r['forward']['streams'] else 'ordinary'}: "
            f"{_pct(rw['mira_op/mira_op_ordinary_stores'])} | "
            f"{r['forward']['head']['rounds']} / {r['forward']['raw']['rounds']} |"
        )
    lines += [
        "",
        "Same headline pairs timed by process CPU time (all threads), a check that does not depend on how "
        "much of the 2 cores the scheduler gave this process:",
        "",
        "| B | mira_linear vs same base-GEMM path | mira_linear vs nn.Linear | base path vs nn.Linear | rounds |",
        "|---|---|---|---|---|",
    ]
    for r in record["batches"]:
        h = r["forward"]["head_cpu_time"]
        lines.append(
            f"| {r['batch']} | {_pct(h['ratios']['mira_linear/base'])} | {_pct(h['ratios']['mira_linear/linear'])} | "
            f"{_pct(h['ratios']['base/linear'])} | {h['rounds']} |"
        )
    lines += [
        "",
        "## Other implementations, each over its own base (overhead = ratio - 1)",
        "",
        "mira_linear over its N = 0 path; the eager and compiled ones (nn.Linear / F.linear inside) over nn.Linear.",
        "",
        "| B | mira_linear | mira_adapter_ alone (time, % of nn.Linear) | smart eager | paper-style eager "
        "| torch.compile(reference) | smart eager / mira overhead | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["batches"]:
        cr = r["forward"]["compare"]["ratios"]
        ad = r["forward"]["mira_adapter_s"]
        lines.append(
            f"| {r['batch']} | {_pct(cr['mira_linear/base'])} | {1e3 * ad['seconds']:.3f} ms, "
            f"{100 * r['forward']['mira_adapter_vs_linear']['ratio']:.2f}% | {_pct(cr['smart_eager/linear'])} | "
            f"{_pct(cr['paper_eager/linear'])} | {_pct(cr['compiled_reference/linear'])} | "
            f"{_times_cheaper(cr['smart_eager/linear'], cr['mira_linear/base'])} | "
            f"{r['forward']['compare']['rounds']} |"
        )
    lines += [
        "",
        "## Training step: forward + backward into x, query, keys (banks frozen), over nn.Linear's forward + "
        "backward into x",
        "",
        "| B | nn.Linear fwd+bwd | FLOP floor | mira_linear | mira_linear vs its N = 0 path | eager reference "
        "| smart eager | reference / mira overhead | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["batches"]:
        t = r.get("training")
        if not t:
            continue
        tr = t["ratios"]
        lines.append(
            f"| {r['batch']} | {1e3 * t['linear_s']['seconds']:.2f} ms | {r['floors']['train_flop_pct']:.2f}% | "
            f"{_pct(tr['mira_linear/linear'])} | {_pct(tr['mira_linear/base'])} | {_pct(tr['reference/linear'])} | "
            f"{_pct(tr['smart_eager/linear'])} | "
            f"{_times_cheaper(tr['reference/linear'], tr['mira_linear/linear'])} | {t['rounds']} |"
        )
    if record.get("gemm_paths"):
        g = record["gemm_paths"]
        lines += [
            "",
            f"## GEMM paths at B={g['batch']} (the design measurement), over one nn.Linear call",
            "",
            f"- per-sample `torch.addmm` calls: {_pct(g['per_sample_addmm'])}",
            f"- per-sample MKL-packed calls (`_mkl_linear`, weight packed for M={T}): "
            f"{_pct(g['per_sample_mkl_packed'])}",
            f"- rounds: {g['rounds']}",
        ]
    lines += ["", record.get("notes", "")]
    return "\n".join(lines) + "\n"


NOTES = """## How the kernel gets there, and what the floors mean

- **Seeded accumulator.** ATen's Linear with bias (`addmm`) writes the broadcast bias into the
  output and then runs one GEMM with beta = 1 over it. The kernel writes `bias + adapter` into the
  Q/V slices in that same write pass (shrink `x A_b^T` and expand per block of 16 tokens of one
  sample, in registers/L1, AVX-512/AVX2/SSE2 loops picked at run time), then runs the same kind of
  GEMM (`addmm_`, beta = 1) over the whole batch. The adapter costs no pass over the output beyond
  the Linear's own; it re-reads x once (for the shrink) and does the FLOP-floor work.
- **Streaming stores** (since 739f0ca). Phase timers at 7d1eefd (B=8, medians of 200 calls
  alternating with nn.Linear) showed the seeding pass's two memory streams adding up instead of
  overlapping: the shrink alone (reading x, 4.8 MB) 126-140 us, the stores alone 381-389 us,
  both 510-550 us; with x forced into L1 the shrink cost 20-30 us, so it is the memory, not the
  arithmetic. An ordinary store first reads the line it writes (write-allocate), and at 14.5 MB
  the output is long evicted when the GEMM reads it back, so that read is wasted; non-temporal
  stores skip it. Interleaved in one process (an experimental switch at 7d1eefd), the raw op
  over nn.Linear: B=2 +1.18% -> +0.60%, B=4 +1.45% -> +1.08%, B=8 +1.40% -> +0.92%, B=16
  +1.58% -> +0.90%; they lose at B=1 (+0.27%: the output fits in cache and the GEMM would have
  found it there) and at B>=24 (+1.6%: glibc maps a block over 32 MiB afresh on every allocation,
  each first touch faults and the kernel zeroes the page through the cache, and streaming over a
  cached line is the slow case). Hence the rule:
  stream when the output exceeds threads x L2 and its pages are resident (mincore), else ordinary
  stores (since 2026-12-06 also only above a quarter of the last-level cache: on a Xeon with a
  300 MiB L3 the B=8 output stays there for the GEMM, and streaming it cost +652 against +109 us
  per call over nn.Linear); the column "kernel's stores vs ordinary stores" measures the choice made at each B. The
  bias-only seeding of the N = 0 path gains nothing from it (-0.09% [-0.20, +0.06] vs nn.Linear):
  the stores alone were not the bottleneck, the two streams together were. A pass streams only
  where it writes each output element once: an expand over more than one register block of
  coefficients (K > 4 with AVX-512) re-reads its output between blocks, and streamed there it lost
  (at cd9dac6, streaming vs ordinary, raw ops at B=8: forward at r=8 +0.80% [+0.49, +1.26]; the
  backward's dx pass, K = S*r = 8: +0.50% [+0.26, +1.02] at r=4, +1.34% at r=8); since 24e390f
  those passes store normally (then: r=8 forward -0.16% [-0.48, +0.16], backward at r=4
  -0.02% [-0.20, +0.22]). (An earlier trial of
  non-temporal stores, before the OpenMP and call-cost work, measured no gain: -0.29% vs -0.27%.)
- **"Same base-GEMM path"** = the op with an empty memory (N = 0). Since 739f0ca, where the store
  rule streams, that is the kernel's own seeding pass with the bias alone and the same beta = 1
  GEMM; elsewhere it is ATen's addmm itself (seed_bias's ordinary stores were +1.3% slower than
  ATen's bias copy on freshly faulted pages at B=32). Bit for bit `F.linear` either way (tested),
  so no speed-up of the Linear itself counts as MIRA being free.
  "Base path vs nn.Linear" is then the public op's call cost plus any difference of the seeding
  pass from ATen's bias copy, and "raw op vs raw base" is the kernel's adapter alone.
- **The public op's call cost** is far larger here than in a warm loop: with caches cold from the
  previous GEMM, every Python frame of the wrapper costs ~5-10 us. Measured at a tiny shape right
  after a 1576x768x2304 GEMM (medians of 300-400 shuffled rounds, several runs): nn.Linear
  99-122 us, F.linear 61-70 us, the bare op call 82-141 us, the wrapper 181-233 us at 1f16c65 and
  128-137 us at 34cceba.
  The steps: b685e2d (the public op's C++ kernel calls the CPU kernel directly instead of
  bouncing through a Python router), 5f16e26 (cached registration lookups), 1f16c65 (eager calls
  are checked once, in C++, by the op kernel; Python re-checks only to word a rejection) and
  34cceba (the CPU case skips the general backend resolution; environment reads without the
  KeyError that os.environ.get raises and catches for an unset name, ~13 us each).
  Under `torch.no_grad()` (not inference mode) the op also passed through torch.library's
  Python autograd kernel, +20-35 us per call (these tables run in inference mode); the op's
  autograd is C++ since the commit after 2943caa (bare op call under no_grad, same harness:
  123 us before, 105 us after, nn.Linear 98-109 us).
- **Where the kernel's own time goes** (steady-clock phase timers inside the op, B=8, alternating
  with nn.Linear, medians of 200 calls; instrumentation not committed; measured at 739f0ca):
  argument checks and allocation 8-9 us; retrieval in double 45-54 us (normalising the 38 cold
  query/key rows 29-32 us, scores and separation 11 us, keeping the copies the backward needs
  9-11 us); mixing 65-83 us (the banks, 1.5 MB, come back from DRAM after each GEMM); the seeding
  pass with the adapter 445-482 us streaming, 526 us with ordinary stores; then the SGEMM
  (25.2-26.4 ms). At 34cceba the seeding pass with the bias alone measured ~370 us.
- **Tried and not kept**: mixing tasks of one contiguous feature range per thread instead of
  256-float chunks (longer streams through the cold banks; at 739f0ca, raw op over nn.Linear
  B=8 +1.00% vs +0.98% before, B=1 +1.57% vs +1.65%: inside the noise); an MKL pre-packed weight
  over the whole batch (-0.18% [-0.38, +0.06] over nn.Linear; at 7d1eefd on a quiet machine
  -0.31% [-0.42, -0.14], too small to build a weight cache for); per-sample packed calls from
  one thread each inside the kernel's parallel region (+5.5%, plain addmm +4.6%);
  packed calls per 394-row chunk (+7.1%); shrink and stores interleaved per 4 rows (no change).
  At 34cceba, each against the same op without it, interleaved: software prefetch of the next
  row block's x and output rows (+0.98..+1.08% against +1.09% over nn.Linear, inside the noise);
  prefetching the banks during retrieval (+0.11% [-0.07, +0.27]); prefetching the next mixing
  task's bank rows (-0.02% [-0.19, +0.20]); retrieval without its second parallel region or
  without the copies only the backward needs (the memory side moved by <= 5 us: the cold misses
  move to whichever phase touches memory first).
- **Garbage collection** is paused while rounds run (benchmarks/_pairs.py), from commit 4b38c18.
- **Before the OpenMP fix** (runs in op_cpu.json before commit 9eef403), the extension was built
  without `-fopenmp`, so `at::parallel_for` (inline in ATen's headers) ran the kernel's loops on
  one thread: those records understate the kernel.
- **Why not per-sample GEMMs**: see "GEMM paths": per-sample calls, plain or MKL-packed for M=197,
  were slower than one call over all B*T rows, so no packed weight is kept (nothing to invalidate).
- **FLOP floor** = MIRA's extra multiply-adds (scores, mixing, shrink, expand) over the Linear's,
  i.e. the overhead at the Linear's own GEMM rate. **Memory floor** = the bytes a separate adapter
  pass must move (re-read x, read-modify-write the Q/V slices) at the measured copy bandwidth,
  over the Linear's time: what `mira_adapter_` (unfused) cannot go below and the fused op avoids.
- **Training floor** = extra multiply-adds of forward + backward (shrink recomputed, dh, dx's
  adapter part, dA, dB, mixing and dw) over the Linear's forward + backward GEMMs.
- The 2 cores are shared with other jobs: nn.Linear at B=8 has measured 21-28 ms across runs and
  single medians drift by ~0.3 percentage points between runs; read the intervals, and the
  CPU-time table, before the medians.
"""


def results_folder(out: Path | None, *, record: bool) -> Path:
    """Where a run writes: ``--out``, else benchmarks/results/ with ``--record``, else the scratch folder.
    A run that is not recorded changes no tracked file (before 2026-12-07 it wrote benchmarks/results/)."""
    return out or (RESULTS if record else latency.SCRATCH_DIR)


def history_problem(log: Path) -> str | None:
    """Why the run history ``log`` (op_cpu.json: {"runs": [...]}) cannot take another run (None when it
    can, or does not exist yet): the run appends to it after 6-8 minutes, too late to find it unreadable."""
    if not log.exists():
        return None
    try:
        runs = json.loads(log.read_text(encoding="utf-8")).get("runs")
    except OSError as e:
        return f"cannot read {log}: {e.strerror or e}"
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, or JSON but not an object
        return f"{log} is not an op_cpu history ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(runs, list):
        return f"{log} is not an op_cpu history (no list of 'runs')"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_cpu", description=__doc__.splitlines()[0],
                                formatter_class=_cli.HelpFormatter)
    p.add_argument("--batches", type=_cli.positive_int, nargs="+", default=[1, 8, 32], help="forward batch sizes")
    p.add_argument("--budget", type=_cli.non_negative_float, default=40.0,
                   help="seconds of headline rounds at B=8 (scaled by B)")
    p.add_argument("--target", type=_cli.positive_float, default=0.005,
                   help="stop a headline run at this 95%% interval width")
    p.add_argument("--train-batches", type=_cli.positive_int, nargs="*", default=[1, 8],
                   help="batch sizes (of --batches) also timed as a training step")
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke run; numbers not meaningful)")
    p.add_argument("--record", action="store_true", help="write to benchmarks/results/ (default: .bench/)")
    p.add_argument("--out", type=Path, default=None,
                   help="where op_cpu.md and op_cpu.json go (default: .bench/, or benchmarks/results/ with --record)")
    args = p.parse_args(argv)
    if args.quick and args.record:
        p.error("--quick runs are never recorded: drop --record or --quick")
    for flag, values in (("--batches", args.batches), ("--train-batches", args.train_batches)):
        if problem := _cli.repeated_problem(flag, values):  # each repeat was timed again
            p.error(problem)
    args.out = results_folder(args.out, record=args.record)
    if not args.quick and (problem := _cli.output_problem(args.out, folder=True)):
        p.error(f"--out: {problem}")  # before the run, not after it
    if not args.quick and (problem := history_problem(args.out / "op_cpu.json")):
        p.error(f"--out: {problem}; repair or move it, or give another --out")  # the run appends to it
    if args.quick:
        args.budget, args.batches, args.train_batches = 1.0, [1], [1]
    if "cpu" not in mk.available_backends("cpu"):
        print("the CPU kernel is not built (make build)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": latency.git_commit(),  # this checkout's, +dirty when its tracked files are edited
        "command": "python -m benchmarks.op_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _pairs.machine_info(),
        "config": dict(T=T, d_in=D_IN, d_out=D_OUT, rank=RANK, slots=SLOTS, slices=SLICES, offsets=OFFSETS),
        "bandwidth_GBps": measure_bandwidth() / 1e9,
        "batches": [],
        "notes": NOTES,
    }
    print(f"commit {record['commit']}, {record['date']}, {_pairs.cpu_line(record['machine'])}\n"
          f"bandwidth {record['bandwidth_GBps']:.1f} GB/s", flush=True)
    for batch in args.batches:
        t0 = time.perf_counter()
        c = make_case(batch)
        compiled = torch.compile(
            lambda x, q, c=c: reference.mira_linear(*_args(c, x, q), slice_offsets=OFFSETS), dynamic=False,
            fullgraph=True,
        )
        checks = check_correctness(c, compiled)
        budget = args.budget * (0.5 if batch == 1 else 1.0 if batch <= 8 else 1.5)
        fwd = forward_timings(c, compiled, budget, args.target, 30 if args.quick else HEAD_MIN_ROUNDS)
        lin_s = fwd["linear_s"]["seconds"]
        lin_macs = batch * T * D_IN * D_OUT
        row = {
            "batch": batch, "checks": checks, "forward": fwd,
            "floors": {
                "flop_pct": 100 * forward_extra_macs(batch) / lin_macs,
                "memory_pct": 100 * (batch * T * (D_IN + 2 * SLICES * D_S) * 4) / (record["bandwidth_GBps"] * 1e9)
                / lin_s,
                "train_flop_pct": 100 * (forward_extra_macs(batch) + backward_extra_macs(batch)) / (2 * lin_macs),
                "gemm_rate_GFLOPs": 2 * lin_macs / lin_s / 1e9,
            },
        }
        if batch in args.train_batches:
            row["training"] = training_timings(c, budget, args.target)
        if batch == 8 or args.quick:
            record["gemm_paths"] = gemm_paths(c, budget / 3) | {"batch": batch}
        record["batches"].append(row)
        h = fwd["head"]["ratios"]
        print(f"B={batch}: mira/base {_pct(h['mira_linear/base'])}, mira/linear {_pct(h['mira_linear/linear'])} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    md = format_markdown(record)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        log = args.out / "op_cpu.json"
        runs = json.loads(log.read_text())["runs"] if log.exists() else []
        with _cli.whole_or_not_at_all():  # op_cpu.json holds every run: rewritten whole or not at all
            (args.out / "op_cpu.md").write_text(md)
            # Beside it, then renamed over it: a crash or kill mid-write cannot truncate the history.
            partial = log.with_name(log.name + ".partial")
            partial.write_text(_pairs.record_json({"runs": runs + [record]}, indent=1, default=str) + "\n")
            os.replace(partial, log)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
