"""Tuning data for the Triton forward's two kernels, within a fixed budget of GPU seconds.

Run on the GPU machine from a tree where the extension is built (after ``benchmarks.gpu_check``:
``cd build/gpu-check/tree && python3 -m benchmarks.gpu_sweep --budget 60 --out $OUT``), with the
machine's own python3 (torch, triton; nothing installed). For the ViT-B/16 qkv projection of the
``op`` phase (``benchmarks.gpu_check.WORKLOAD``: T=197, 768 -> 2304, r=4, N=30, slices q and v,
affine; the same seeded inputs, all tensors in the dtype, query = x[:, 0]) at each dtype and
batch it times

- ``pair``: the planner's two launches (retrieve, then the fused GEMM), as ``mira_linear`` runs them,
  then the best retrieval and GEMM variants of earlier sweeps launched together;
- ``retrieve``: ``_mira_retrieve_kernel`` alone, the planner's launch parameters, then variants of
  BLOCK_B / BLOCK_K / BLOCK_F, the column split (grid[1]), num_warps, num_stages;
- ``gemm``: ``_mira_gemm_kernel`` alone (its factors from the planner's retrieval), the planner's
  tile, then variants of BLOCK_M / N / K, num_warps, num_stages and the column groups;
- ``linear``: ``F.linear`` (cuBLAS), the baseline, timed again after every config (interleaved);
- diagnostics (16-bit): the GEMM with no adapter, the shrink in its own launch, the retrieval with
  one 64-wide cosine step: differences against the planner's place the time (their outputs solve
  another problem and are not checked against the planner's).

Variants are planned by the product's own launchers under :func:`mira_kernels.triton.configs.overriding`
(so grids, orders, samples per block follow the tile exactly as they would in the table), except
the retrieval's num_stages, which the launcher fixes at 2: it is set on the planned launch. Each
variant is run once and checked against the planner's output (mixed factors for ``retrieve``, y for
``gemm``); a wrong one is recorded and not timed; one that fails to compile is recorded with its
error. A variant whose launches equal the planner's (``same_as_planner``: e.g. a group count the
planner takes already) or those of a config scheduled before it for the same dtype and batch
(``same_as_earlier``, naming it in ``same_as``) is recorded and not timed: it would be the same
measurement again. Each record lists the parameters read back from the launch that ran (the override
reached it, or the record says so), and the compiled kernel's registers and spills when Triton exposes
them.

Timing (CUDA): ``CALLS`` back-to-back launches captured in one CUDA graph, the replay timed with
CUDA events, per launch: ``warm_us`` is the median over ``REPS`` replays (inputs stay in L2 between
launches: a steady state, not a cold call); ``flushed_us`` the median over replays of the
difference between a graph of (L2 flush, launch) pairs and one of flushes alone (flush = zeroing
twice the L2 size; a launch that starts early under programmatic dependent launch may overlap the
flush's tail). The GEMM alone keeps the planner's programmatic dependent launch: each launch waits
(gdc_wait) for the one before only where it first reads the factors, as it waits for the
retrieval in the product. Compile and check time is not timed.

Budget: ``--budget`` seconds of wall time in all; a config starts only if ``--margin`` seconds are
left. Triton compiles (~0.5-2.5 s each) are the dominant cost, so on CUDA ``--workers`` child
processes (default min(8, CPUs - 4)) compile the configs ahead into Triton's on-disk cache with
``kernel.warmup`` (no launch, no GPU time), and the parent's first run of a config loads it. The
JSON is rewritten after every config, so a kill keeps what was measured; SIGTERM (an outer
``timeout``) stops the workers and marks the record interrupted. Configs run in order of expected
value: the planner's at every batch first, then the variants by rank, batch-interleaved, bf16
before fp32. ``best`` (JSON and the table's head) lists, per kernel, the planner's time and the
fastest variant's.

``--dry-run`` plans every config on ``meta`` tensors (no GPU, no compile), checks that each override
reaches its launch, and estimates the run's time; with ``--lower 90`` it also compiles each for
sm_90 without a GPU (``mira_kernels.triton.lowering``) and records registers, stack and shared memory.
``--device cpu`` (with ``TRITON_INTERPRET=1``) runs the whole loop under the Triton interpreter,
timed by the wall clock: a test, not a figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import _cli

SCHEMA = "mira-gpu-sweep/1"
CALLS = 20  # launches per captured graph
REPS = 9  # graph replays per measurement (medians)
#: Assumed cost of one config on the GPU machine, for the dry run's estimate: a Triton compile
#: (~0.5-2 s; the planner's configs are usually cached by the gpu-check tests) plus check and timing.
EST_CONFIG_S = 1.6
EST_SETUP_S = 6.0  # imports, CUDA context, inputs, references
EST_RUN_S = 0.3  # a config compiled ahead: cache load, check, graphs and replays
GPU_WORKERS = 8  # compile-ahead workers on the 16-core GPU machine (the default there)


@dataclass(frozen=True)
class Variant:
    """One config: ``kernel`` is "pair" (both launches, as the op runs them), "retrieve" or "gemm"."""

    kernel: str
    name: str
    rank: int  # order of expected value (0: the planner's)
    retrieve: dict | None = None  # RetrieveConfig fields
    split: int | None = None  # retrieval column shares (grid[1])
    stages: int | None = None  # retrieval num_stages (set on the launch)
    gemm: dict | None = None  # FusedConfig fields
    groups: int | None = None  # GEMM programs per row block
    fold: bool | None = None  # False: the shrink in its own launch (where the planner folds it)
    #: Diagnostics time a different problem, so their output is not compared with the planner's:
    #: "no-adapter" (N = 0: the GEMM alone, LORA = 0), "dk64" (query and keys cut to 64 columns: the
    #: retrieval with one cosine step).
    problem: str | None = None

    @property
    def override(self) -> dict:
        return {k: v for k, v in dict(retrieve=self.retrieve, split=self.split, stages=self.stages, gemm=self.gemm,
                                      groups=self.groups, fold=self.fold, problem=self.problem).items()
                if v is not None}


#: A group count above any column-tile count: one program per column tile (overriding clamps it).
ALL = 1 << 20


def _tile(m, n, k, w, s) -> dict:
    return dict(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=s)


def variants(dtype_name: str, batch: int, tokens: int) -> list[Variant]:
    """The configs of one (dtype, batch), the planner's first; ``rank`` orders them across batches.

    16-bit: the retrieval's 19 us at B=1 looks like a serial chain of cold loads (12 BLOCK_K=64
    steps of the cosine loop), so wider K steps (to 128) and deeper pipelining come first, then more or fewer
    programs; the GEMM tries the neighbours of the planner's tile (cuBLAS picks 192 x 192 at B=64,
    which Triton's power-of-two blocks cannot). fp32 (IEEE, FMA units; torch's default
    allow_tf32=False) gets a few K-step and tile neighbours.
    """
    out = [Variant("pair", "planner", 0), Variant("retrieve", "planner", 0), Variant("gemm", "planner", 0)]
    m = batch * tokens
    R = lambda name, rank, **kw: Variant("retrieve", name, rank, **kw)  # noqa: E731
    G = lambda name, rank, **kw: Variant("gemm", name, rank, **kw)  # noqa: E731
    # Pairs: the best retrieval and GEMM variants of the first H200 sweep (ede8e19) launched together,
    # as the op runs them (on Hopper the GEMM overlaps the retrieval through PDL): what a planner
    # change would buy is the pair's time, not the sum of the kernels timed alone.
    P = lambda name, rank, **kw: Variant("pair", name, rank, **kw)  # noqa: E731
    # Where the time goes (diagnostics, 16-bit only): the GEMM without any adapter (vs cuBLAS and the
    # planner's fused GEMM: the adapter's cost inside the GEMM), with the shrink in its own launch
    # (the folded shrink's cost in the main loop), the retrieval with a single 64-wide cosine step
    # (vs the planner's 12: the score chain's share).
    diagnostics = [G("no-adapter", 1, problem="no-adapter"), G("unfolded", 1, fold=False),
                   P("unfolded", 2, fold=False), R("dk64", 1, problem="dk64")]
    # Up to configs.SHRINK_BESIDE_ROWS rows an unfolded plan chains its three launches by PDL (the GEMM
    # waits only before its expand): there the "unfolded" pair times what bf16 would get from that plan.
    # The fourth sweep (9c67b4a): the cosine loop is ~14 of the retrieval's 20 us at B <= 8 (dk64:
    # 6.5 us) and ncu shows it issue-bound (one warp per scheduler, 5.3 cycles per instruction).
    # Since then the planner's retrieval below 16 samples is a tile of next_pow2(B) rows with the
    # cosines' reductions deferred past the d_k loop ("fma") and FMA mixing (configs._retrieve_config:
    # 1.8-4.1 instead of 11.2 sm_90 SASS instructions per d_k element, not yet timed). Against it: the
    # previous planner's 16-row tile with the precision rule's dots ("rows16"), the stepwise FMA dot
    # on the small tile ("ieee-dot": 3.9 per element), the d_k step halved.
    if batch < 16:
        rows16 = (dict(block_b=16, block_k=64, block_f=64, score_precision=None, mix_precision=None)
                  if dtype_name in ("bfloat16", "float16") else
                  dict(block_b=16, block_k=16, block_f=16, score_precision=None, mix_precision=None))
        import torch

        from benchmarks.gpu_check import WORKLOAD
        from mira_kernels.triton import configs

        # The planner's d_k step for the workload, halved.
        half_k = configs.retrieve_config(WORKLOAD["slots"], torch.float32, "tf32", batch).block_k // 2
        candidates = [R("rows16", 1, retrieve=rows16), P("rows16", 1, retrieve=rows16),
                      R("ieee-dot", 1, retrieve=dict(score_precision="ieee")),
                      P("ieee-dot", 2, retrieve=dict(score_precision="ieee")),
                      R(f"k{half_k}", 2, retrieve=dict(block_k=half_k))]
        if batch >= 2:  # two row tiles of half the rows: fewer instructions per d_k element, same programs
            candidates.append(R("half-rows", 3, retrieve=dict(block_b=1 << ((batch - 1).bit_length() - 1))))
    else:
        # cosines on FMA units ("ieee", fp32 rounding to nearest) take 28% fewer instructions per d_k
        # element than 3xTF32 (sm_90 SASS); 32-wide steps keep fewer operand registers.
        candidates = [R("ieee-scores", 1, retrieve=dict(score_precision="ieee")),
                      R("ieee-scores-k32", 2, retrieve=dict(score_precision="ieee", block_k=32)),
                      P("ieee-scores", 1, retrieve=dict(score_precision="ieee"))]
    if dtype_name in ("bfloat16", "float16"):
        out += candidates + diagnostics
        # Spills from `--dry-run --lower 90` (Triton 3.6): the planner's retrieval has 8 bytes of stack
        # at 168 registers; BLOCK_K=256 spilled 488-712 bytes (4 or 8 warps), so K steps stop at 128.
        out += [
            R("s3", 1, stages=3),
            R("w8", 2, retrieve=dict(num_warps=8)),
            R("f32-split2x", 3, retrieve=dict(block_f=32), split=-2),  # -2: twice the planner's split
            R("s4", 5, stages=4),
            R("split32", 5, split=32),  # B <= 16: half the planner's 64 programs; B=64: twice its 16 shares
            P("s3", 1, stages=3),
        ]
        if batch >= 16:  # below, the deferred sums' product tile bounds the d_k step (configs)
            out += [
                R("k128", 1, retrieve=dict(block_k=128)),
                R("k128-s3", 2, retrieve=dict(block_k=128), stages=3),
                R("k128-f128", 4, retrieve=dict(block_k=128, block_f=128)),
                R("k128-w8-s3", 4, retrieve=dict(block_k=128, num_warps=8), stages=3),
                P("k128-f128", 2, retrieve=dict(block_k=128, block_f=128)),
            ]
        if batch >= 32:
            out += [R("b64", 2, retrieve=dict(block_b=64)), R("b32", 3, retrieve=dict(block_b=32))]
        # ALL: one program per column tile (the planner's cost model counts 132 programs a wave and
        # gives B=1 only 48 programs of 3 tiles each; an SM holds several 4-warp programs). Above
        # M=512 the planner's 128 x 256 x 32 spills 40 bytes; 128 x 256 x 64, 256 x 128, 64 x 256 and
        # 4-warp 128 x 128 tiles spilled 80-2152, 256 x 128 x 32 680, programs of several tiles (fewer
        # groups) 360-392; the ones below do not spill (128 x 256 x 32 in 3 stages: 48 bytes).
        if m <= 512:
            out += [
                P("groups-all", 1, groups=ALL),
                P("s3+groups-all", 1, stages=3, groups=ALL),
                P("s3+64x64x128-w4s3-all", 2, stages=3, gemm=_tile(64, 64, 128, 4, 3), groups=ALL),
                P("f32-split2x+groups-all", 3, retrieve=dict(block_f=32), split=-2, groups=ALL),
                G("groups-all", 1, groups=ALL),
                G("64x128x64-w4s3", 2, gemm=_tile(64, 128, 64, 4, 3)),
                G("32x64x64-w4s3-all", 2, gemm=_tile(32, 64, 64, 4, 3), groups=ALL),
                G("64x64x128-w4s3-all", 3, gemm=_tile(64, 64, 128, 4, 3), groups=ALL),
                G("64x64x64-w4s4-all", 4, gemm=_tile(64, 64, 64, 4, 4), groups=ALL),
                G("128x64x64-w8s3", 5, gemm=_tile(128, 64, 64, 8, 3)),
            ]
        else:
            out += [
                G("128x128x64-w8s4-all", 1, gemm=_tile(128, 128, 64, 8, 4), groups=ALL),
                G("128x256x32-w8s3", 2, gemm=_tile(128, 256, 32, 8, 3)),
                G("128x128x64-w8s3-all", 2, gemm=_tile(128, 128, 64, 8, 3), groups=ALL),
                G("128x128x32-w8s4-all", 3, gemm=_tile(128, 128, 32, 8, 4), groups=ALL),
                G("64x128x64-w4s4-all", 4, gemm=_tile(64, 128, 64, 4, 4), groups=ALL),
                G("128x64x64-w4s4-all", 5, gemm=_tile(128, 64, 64, 4, 4), groups=ALL),
            ]
    else:
        # The fp32-x retrieval forms its cosines in fp64 on FMA units, in d_k steps the launcher bounds
        # (8 wide on 16-sample tiles, launchers.WIDE_BLOCK_K; 64 / 16 at B = 1 / 8): an override cannot
        # widen them.
        out += [
            R("s3", 1, stages=3),
            R("f32", 2, retrieve=dict(block_f=32)),
            R("split2x", 3, retrieve=dict(block_f=32) if batch < 16 else None, split=-2),
            # The planner's fp32 GEMM spills 24 bytes, 128 x 64 x 16 on 8 warps none (sm_90, Triton 3.6).
            G("128x64x16-w8s2", 1, gemm=_tile(128, 64, 16, 8, 2)),
            G("64x64x32-w4s2", 2, gemm=_tile(64, 64, 32, 4, 2)),
            G("64x64x16-w4s3", 3, gemm=_tile(64, 64, 16, 4, 3)),
            P("s3", 1, stages=3),
            P("s3+128x64x16-w8s2", 1, stages=3, gemm=_tile(128, 64, 16, 8, 2)),
        ]
    return out


def schedule(dtypes: list[str], batches: list[int], tokens: int) -> list[tuple[str, int, Variant]]:
    """Every config in run order: by dtype (listed order), then rank, then batch; per (rank, batch)
    the pair, then retrieve before gemm variants."""
    kinds = {"pair": 0, "retrieve": 1, "gemm": 2}
    rows = []
    for di, d in enumerate(dtypes):
        for b in batches:
            for i, v in enumerate(variants(d, b, tokens)):
                rows.append(((di, v.rank, batches.index(b), kinds[v.kernel], i), (d, b, v)))
    return [r for _, r in sorted(rows, key=lambda t: t[0])]


# ----------------------------------------------------------------------------------------------
# Planning with overrides, and reading back what the launch got.
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """Inputs of one (dtype, batch) and the planner's own launches and outputs."""

    dtype_name: str
    batch: int
    inputs: dict
    opts: dict
    planner: list = field(default_factory=list)  # Launch list of the planner
    y: object = None
    shapes: dict = field(default_factory=dict)
    #: (kernel, problem, launch parameters) -> "kernel:variant" of the config first planned with them
    scheduled: dict = field(default_factory=dict)


def plan(case: Case, v: Variant | None = None, base: list | None = None):
    """(y, launches) of mira_linear for ``case`` with ``v``'s overrides. Relative counts (split or
    groups < 0: -k times the planner's) are resolved against ``base`` (the planner's launches)."""
    from mira_kernels.triton import configs, launchers

    v = v or Variant("pair", "planner", 0)
    split, groups = v.split, v.groups
    if split is not None and split < 0:
        split = -split * _launch(base, "retrieve").grid[1]
    if groups is not None and groups < 0:
        groups = -groups * _launch(base, "gemm").constexprs["GROUPS"]
    i = case.inputs
    query, keys, bank_a, bank_b = i["x"][:, 0], i["keys"], i["bank_a"], i["bank_b"]
    if v.problem == "no-adapter":
        keys, bank_a, bank_b = keys[:0], bank_a[:0], bank_b[:0]
    elif v.problem == "dk64":
        query, keys = query[:, :64], keys[:, :64]
    with configs.overriding(retrieve=v.retrieve, retrieve_split=split, gemm=v.gemm, gemm_groups=groups, fold=v.fold):
        y, launches = launchers.plan_linear(i["x"], i["weight"], i["bias"], query, keys, bank_a, bank_b, **case.opts)
    if v.stages is not None:
        _launch(launches, "retrieve").num_stages = v.stages
    return y, launches, dict(split=split, groups=groups)


def _launch(launches, name: str):
    return next(launch for launch in launches if launch.name == name)


_SHOWN = ("BLOCK_B", "BLOCK_K", "BLOCK_F", "NC", "BLOCK_M", "BLOCK_N", "GROUPS", "TILES", "SPB", "J_PAD", "LORA",
          "USE_PDL", "SCORE_PRECISION")


def params(launch) -> dict:
    """The launch parameters that ran (read back from the planned launch)."""
    p = {k: v for k, v in launch.constexprs.items() if k in _SHOWN}
    p.update(grid=list(launch.grid), num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.maxnreg is not None:
        p["maxnreg"] = launch.maxnreg
    return p


_RETRIEVE_FIELDS = dict(block_b="BLOCK_B", block_k="BLOCK_K", block_f="BLOCK_F", slot_chunk="NC",
                        score_precision="SCORE_PRECISION", mix_precision="MIX_PRECISION")
_GEMM_FIELDS = dict(block_m="BLOCK_M", block_n="BLOCK_N", block_k="BLOCK_K")


def mismatches(v: Variant, launches, resolved: dict) -> list[str]:
    """Override fields that did not reach the launch (empty: every one did)."""
    bad = []

    def want(ok, what):
        if not ok:
            bad.append(what)

    if v.kernel in ("retrieve", "pair"):
        r = _launch(launches, "retrieve")
        for f, value in (v.retrieve or {}).items():
            got = r.num_warps if f == "num_warps" else r.constexprs[_RETRIEVE_FIELDS[f]]
            if value is None and f.endswith("_precision"):  # None: the precision rule's, never "fma"
                want(got != "fma", f"retrieve {f}=None (the rule's) but the launch has {got}")
                continue
            want(got == value, f"retrieve {f}={value} but the launch has {got}")
        if resolved.get("split") is not None:
            want(r.grid[1] == resolved["split"], f"split={resolved['split']} but grid={r.grid}")
        if v.stages is not None:
            want(r.num_stages == v.stages, f"num_stages={v.stages} but {r.num_stages}")
    if v.kernel in ("gemm", "pair"):
        g = _launch(launches, "gemm")
        for f, value in (v.gemm or {}).items():
            got = getattr(g, f) if f in ("num_warps", "num_stages") else g.constexprs[_GEMM_FIELDS[f]]
            want(got == value, f"gemm {f}={value} but the launch has {got}")
        if resolved.get("groups") is not None:
            got = g.constexprs["GROUPS"]
            tiles = sum(n >= 0 for n in g.constexprs["ORDER"])  # column tiles of a row block
            want(got == min(resolved["groups"], tiles), f"groups={resolved['groups']} but GROUPS={got}")
        if v.fold is False:
            want(g.constexprs["LORA"] == 2, "fold=False but the GEMM folds the shrink in")
    return bad


def _phases():
    from benchmarks import _gpu_check_phases

    return _gpu_check_phases


def _rel_err(got, want) -> float:
    return _phases()._rel_err(got, want)  # 2-norm relative error; inf when got is not finite


def _short(exc: BaseException) -> str:
    # Head and tail: a Triton compile error names the failing pass first and the cause last.
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 1200 else text[:700] + " ... " + text[-500:]


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------


class Timer:
    """CUDA: graphs of CALLS launches (warm, and with an L2 flush before each); CPU: the wall clock."""

    def __init__(self, device, reps: int = REPS, calls: int = CALLS):
        import torch

        self.device, self.reps, self.calls = device, reps, calls
        self.cuda = device.type == "cuda"
        self._flush_buf = self._flush_graph = self.flush_error = None
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
            self._flush_buf = torch.empty(max(2 * l2, 64 * 2**20) // 4, dtype=torch.int32, device=device)
            try:
                self._flush_graph = self._graph(lambda: None, flush=True)
            except Exception as exc:  # noqa: BLE001 - warm timings can still be taken
                self.flush_error = _short(exc)

    def _flush(self):
        self._flush_buf.zero_()

    def _graph(self, fn: Callable[[], object], flush: bool):
        import torch

        def body():
            for _ in range(self.calls):
                if flush:
                    self._flush()
                fn()

        graph, replay = _phases()._capture(body)
        replay()  # the first replay uploads the graph
        torch.cuda.synchronize(self.device)
        return graph

    def _replay_us(self, graph) -> float:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000.0 / self.calls

    def time(self, fn: Callable[[], object], flushed: bool = True) -> dict:
        if not self.cuda:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return {"warm_us": statistics.median(times), "flushed_us": None}
        warm = self._graph(fn, flush=False)
        cold = self._graph(fn, flush=True) if flushed and self._flush_graph is not None else None
        w, f = [], []
        for _ in range(self.reps):
            w.append(self._replay_us(warm))
            if cold is not None:
                f.append(self._replay_us(cold) - self._replay_us(self._flush_graph))
        del warm, cold
        return {"warm_us": statistics.median(w), "flushed_us": statistics.median(f) if f else None,
                "warm_spread_us": [min(w), max(w)]}


# ----------------------------------------------------------------------------------------------
# One config.
# ----------------------------------------------------------------------------------------------


def tolerance(dtype_name: str) -> float:
    """Largest relative error (2-norm) a variant may differ from the planner's output by: other
    tiles sum in another order and round the 16-bit outputs at other places; a wrong config
    (missed tiles, wrong factors) is off by O(1)."""
    return 2e-2 if dtype_name in ("bfloat16", "float16") else 2e-3


def _compiled(kernel, before: set) -> object | None:
    """The kernel Triton compiled since ``before`` (its JIT caches' keys), for registers and spills;
    None if this Triton keeps them elsewhere."""
    try:
        for cache in getattr(kernel, "device_caches", {}).values():
            for key, compiled in cache[0].items():
                if key not in before:
                    return compiled
    except Exception:  # noqa: BLE001 - an internal layout this code does not know
        return None
    return None


def _cache_keys(kernel) -> set:
    try:
        return {key for cache in getattr(kernel, "device_caches", {}).values() for key in cache[0]}
    except Exception:  # noqa: BLE001
        return set()


def prepare(case: Case, v: Variant):
    """Plans ``v`` and checks its overrides reached the launch: (record, y, launches, target kernel);
    the record has a status when the config stops here (plan error, override lost, the planner's)."""
    rec: dict = {"dtype": case.dtype_name, "batch": case.batch, "kernel": v.kernel, "variant": v.name, "rank": v.rank,
                 "override": v.override}
    try:
        y, launches, resolved = plan(case, v, case.planner)
    except Exception as exc:  # noqa: BLE001
        rec.update(status="plan_error", error=_short(exc))
        return rec, None, None, None
    target = {"pair": None, "retrieve": "retrieve", "gemm": "gemm"}[v.kernel]
    shown = launches if target is None else [_launch(launches, target)]
    rec["params"] = {launch.name: params(launch) for launch in shown}
    bad = mismatches(v, launches, resolved)
    planner = ({launch.name: params(launch) for launch in case.planner} if target is None
               else {target: params(_launch(case.planner, target))})
    key = (v.kernel, v.problem, json.dumps(rec["params"], sort_keys=True, default=str))
    if bad:
        rec.update(status="override_not_applied", error="; ".join(bad))
    elif v.name != "planner" and v.problem is None and rec["params"] == planner:
        rec.update(status="same_as_planner")  # e.g. a split or group count the planner takes already
    elif key in case.scheduled:  # e.g. two pairs whose group counts both clamp to one tile per program
        rec.update(status="same_as_earlier", same_as=case.scheduled[key])
    else:
        case.scheduled[key] = f"{v.kernel}:{v.name}"
    return rec, y, launches, target


def run_launches(launches, watched, sync) -> dict:
    """Runs ``launches`` once (compiling what is new) and returns, for each of ``watched`` that this
    run compiled or loaded, the kernel's registers per thread and spill (local memory) bytes."""
    before = {id(launch.kernel): _cache_keys(launch.kernel) for launch in watched}
    for launch in launches:
        launch.run()
    sync()
    res = {}
    for launch in watched:
        k = _compiled(launch.kernel, before[id(launch.kernel)])
        if k is not None:
            res[launch.name] = {a: getattr(k, a, None) for a in ("n_regs", "n_spills")}
    return res


def run_config(case: Case, v: Variant, timer: Timer, sync: Callable[[], None]) -> dict:
    """Plans, compiles, checks and times one config; returns its record (never raises)."""
    import torch

    t0 = time.monotonic()
    rec, y, launches, target = prepare(case, v)
    if "status" in rec:
        return rec
    timed = [_launch(launches, target)] if target else launches
    try:
        res = run_launches(launches, timed, sync)
        rec["compile_s"] = round(time.monotonic() - t0, 3)
        if res:
            rec["resources"] = res
    except Exception as exc:  # noqa: BLE001 - Triton rejects a config: record it, continue
        rec.update(status="compile_error", error=_short(exc), compile_s=round(time.monotonic() - t0, 3))
        return rec
    if v.problem is not None:
        err = None  # another problem: nothing to compare with (a timing diagnostic only)
    elif v.kernel == "retrieve":
        mine, ref = _launch(launches, "retrieve").args, _launch(case.planner, "retrieve").args
        err = max(_rel_err(mine["mixed_a_ptr"], ref["mixed_a_ptr"]), _rel_err(mine["mixed_b_ptr"], ref["mixed_b_ptr"]))
    else:
        err = _rel_err(y, case.y)
    rec["rel_err_vs_planner"] = err
    if err is not None and not err <= tolerance(case.dtype_name):
        rec.update(status="wrong",
                   error=f"relative error {err:.3g} vs the planner's output > {tolerance(case.dtype_name)}")
        return rec

    def call():
        for launch in timed:
            launch.run()

    try:
        with torch.no_grad():
            rec.update(timer.time(call))
            i = case.inputs
            lin = timer.time(lambda: torch.nn.functional.linear(i["x"], i["weight"], i["bias"]), flushed=False)
        rec["linear_warm_us"] = lin["warm_us"]  # interleaved baseline: measured right after this config
        rec["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        rec.update(status="timing_error", error=_short(exc))
    return rec


# ----------------------------------------------------------------------------------------------
# Compiling ahead in worker processes (compiles dominate the budget; the GPU machine has 16 cores).
# ----------------------------------------------------------------------------------------------

#: Configs the parent compiles itself while the workers start (the planner's: often cached already).
WORKER_SKIP = 3


def launch_options(launch) -> dict:
    """The keywords ``Launch.run`` passes besides the arguments and constexprs (mirrored here for
    ``kernel.warmup``, which compiles without launching; tests/test_gpu_sweep.py compares the two:
    a difference would only cost the worker's compile, the parent compiling its own)."""
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.pdl:
        options["launch_pdl"] = True
    if launch.maxnreg is not None:
        options["maxnreg"] = launch.maxnreg
    return options


def precompile(launch) -> None:
    """Compiles ``launch`` into Triton's on-disk cache (no launch: no GPU time taken from the timing)."""
    if any(g == 0 for g in launch.grid):
        return
    launch.kernel.warmup(grid=launch.grid, **launch.args, **launch.constexprs, **launch_options(launch))


def _worker(spec: str, todo, workload, device, deadline) -> int:
    """``--worker I/N``: compiles configs WORKER_SKIP + I, + I + N, ... until the deadline; the parent's
    first run of each then loads it from the cache. Prints a JSON line (counts, first error) per config."""
    i, n = (int(p) for p in spec.split("/"))
    cases: dict = {}
    stats = {"worker": i, "of": n, "compiled": 0, "failed": 0, "first_error": None}
    for d, b, v in todo[WORKER_SKIP + i::n]:
        if time.monotonic() > deadline:
            break
        try:
            case = cases.get((d, b))
            if case is None:
                case = cases[(d, b)] = make_case(workload, d, b, device, empty=True)
                case.y, case.planner, _ = plan(case)
            rec, _, launches, target = prepare(case, v)
            if "status" in rec:
                continue
            for launch in launches if target is None else [_launch(launches, target)]:
                precompile(launch)
            stats["compiled"] += 1
        except Exception as exc:  # noqa: BLE001 - the parent compiles (and records) it itself
            stats["failed"] += 1
            stats["first_error"] = stats["first_error"] or _short(exc)[:300]
        print(json.dumps(stats), flush=True)  # after every config: a terminated worker still reports
    stats["finished"] = True
    print(json.dumps(stats), flush=True)
    return 0


def _start_workers(args, n: int, budget: float) -> list:
    import subprocess
    import tempfile

    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "--worker", f"{i}/{n}", "--budget",
               f"{max(budget, 0.0):.1f}",  # the time left, which --budget refuses when negative
               "--out", str(args.out), "--dtypes", args.dtypes, "--batches", args.batches, "--device", args.device]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--max-configs", str(args.max_configs)] if args.max_configs is not None else []
        out = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out))
    return procs


def _stop_workers(procs) -> list[dict]:
    """Ends the workers this run started (each by its own handle) and reports what they did."""
    import subprocess

    report = []
    for proc, out in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.strip()]
        out.close()
        entry: dict = {"rc": proc.returncode}
        try:
            entry.update(json.loads(lines[-1]))
        except (IndexError, ValueError):
            entry["output_tail"] = "\n".join(lines[-8:])[-1500:]
        report.append(entry)
    return report


# ----------------------------------------------------------------------------------------------
# Inputs, machine, output.
# ----------------------------------------------------------------------------------------------


def _workload(tiny: bool) -> dict:
    from benchmarks.gpu_check import WORKLOAD

    w = dict(WORKLOAD)
    if tiny:  # CPU test under the interpreter
        w.update(tokens=5, d_in=16, d_out=48, slice_offsets=[0, 32], slots=3)
    return w


def make_case(workload: dict, dtype_name: str, batch: int, device, empty: bool = False) -> Case:
    """Inputs of the op phase (same seed) on ``device``; ``empty``: uninitialised (shapes, strides and
    alignment only, as a compile-ahead worker needs)."""
    import torch

    from mira_kernels import reference

    phases = _phases()
    dtype = getattr(torch, dtype_name)
    if device.type == "meta" or empty:
        base = phases._op_inputs(workload, 1, 0)  # shapes only
        low = {k: torch.empty((batch,) + v.shape[1:] if k == "x" else v.shape, dtype=dtype, device=device)
               for k, v in base.items()}
    else:
        low = {k: v.to(device=device, dtype=dtype)
               for k, v in phases._op_inputs(workload, batch, workload["seed"] + batch).items()}
    opts = dict(slice_offsets=list(workload["slice_offsets"]), separation=workload["separation"],
                scale=float(workload["scale"]), eps=reference.DEFAULT_EPS)
    shapes = {k: list(v.shape) for k, v in low.items()}
    shapes.update(query="x[:, 0]", M=batch * workload["tokens"])
    return Case(dtype_name, batch, low, opts, shapes=shapes)


def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(device)), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        info["gpu"] = None
    return info


def table(doc: dict) -> str:
    """The readable summary (gpu_sweep.txt)."""
    m = doc["machine"]
    lines = [f"mira-kernels gpu_sweep ({doc['mode']}), started {doc['started']}, status {doc['status']}",
             f"  machine: {m.get('gpu')} sm {m.get('capability')} {m.get('sms')} SMs; torch {m['torch']}, "
             f"triton {m.get('triton')}, tf32 {m['tf32_matmul']}",
             f"  timing: {doc['timing']['method']}",
             f"  {len(doc['results'])} configs run, {len(doc['not_run'])} not run; {doc.get('elapsed_s', 0):.1f} s"]
    for w in doc.get("workers") or []:
        lines.append(f"  compile-ahead worker {w.get('worker')}: rc {w.get('rc')}, compiled {w.get('compiled')}, "
                     f"failed {w.get('failed')}" + (f" ({w['first_error'][:100]})" if w.get("first_error") else ""))
    if doc.get("estimate_s") is not None:
        n = len(doc["results"])
        fit = max(0, int((doc["budget_s"] - EST_SETUP_S) // EST_CONFIG_S))
        lines.append(f"  estimate without compile-ahead workers: {doc['estimate_s']:.0f} s for all {n} configs "
                     f"({EST_CONFIG_S} s each + {EST_SETUP_S} s setup); --budget {doc['budget_s']:g} runs about "
                     f"the first {min(fit, n)}")
        per = max(EST_RUN_S, EST_CONFIG_S / (1 + GPU_WORKERS))
        fit = max(0, int((doc["budget_s"] - EST_SETUP_S) // per))
        lines.append(f"  with {GPU_WORKERS} workers (16 CPUs): about {EST_SETUP_S + per * n:.0f} s for all {n} "
                     f"({per:.2f} s each); --budget {doc['budget_s']:g} runs about the first {min(fit, n)}")
    groups: dict = {}
    for r in doc["results"]:
        groups.setdefault((r["dtype"], r["batch"]), []).append(r)
    best = best_variants(doc["results"])
    if best:
        lines.append("\nbest per kernel (us per launch; planner -> best variant; L2-flushed where measured, else warm)")
        lines += [f"  {b['dtype']:8} B={b['batch']:<3} {b['kernel']:8} {b['planner_us']:7.1f} -> {b['best_us']:7.1f} "
                  f"({b['speedup']:.2f}x) {b['variant']}  [{b['measure']}]" for b in best]
    for (d, b), rows in groups.items():
        lines.append(f"\n{d} B={b}   (us per launch: warm | L2-flushed; linear = F.linear warm, measured right after)")
        for r in sorted(rows, key=lambda r: ({"pair": 0, "retrieve": 1, "gemm": 2}[r["kernel"]], r["rank"])):
            p = r.get("params", {})
            desc = " ".join(_brief(name, q) for name, q in p.items())
            if r["status"] == "ok":
                fl = r.get("flushed_us")
                t = f"{r['warm_us']:8.1f} | {fl:7.1f}" if fl is not None else f"{r['warm_us']:8.1f} |     n/a"
                t += f"  linear {r['linear_warm_us']:6.1f}"
                res = r.get("resources") or {}
                spills = [f"{k}:{q.get('n_regs')}r/{q.get('n_spills')}sp" for k, q in res.items()]
                t += "  " + " ".join(spills)
            else:
                t = r["status"] + (f": {r['error'].splitlines()[0][:100]}" if r.get("error") else "")
                t += f" ({r['same_as']})" if r.get("same_as") else ""
                for k, q in (r.get("lowered") or {}).items():
                    t += (f"  {k}: sm_{q['arch']} {q['registers']}r stack {q['stack']} shared {q['shared']}"
                          f"{' wgmma' if q['wgmma'] else ''} {q['compile_s']}s")
            lines.append(f"  {r['kernel']:8} {r['variant']:16} {t}\n      {desc}")
    if doc["not_run"]:
        names = [f"{n['dtype']} B={n['batch']} {n['kernel']}:{n['variant']}" for n in doc["not_run"][:40]]
        lines.append(f"\nnot run (budget): {len(doc['not_run'])}: " + ", ".join(names))
    return "\n".join(lines) + "\n"


def best_variants(results: list[dict]) -> list[dict]:
    """Per (dtype, batch, kernel): the planner's time and the fastest measured variant's."""
    out = []
    keys = dict.fromkeys((r["dtype"], r["batch"], r["kernel"]) for r in results)
    for d, b, k in keys:
        rows = [r for r in results if (r["dtype"], r["batch"], r["kernel"]) == (d, b, k) and r["status"] == "ok"
                and "problem" not in r["override"]]  # diagnostics time another problem
        planner = next((r for r in rows if r["variant"] == "planner"), None)
        if planner is None:
            continue
        measure = "flushed_us" if planner.get("flushed_us") is not None else "warm_us"
        rows = [r for r in rows if r.get(measure) is not None]
        fastest = min(rows, key=lambda r: r[measure])
        out.append(dict(dtype=d, batch=b, kernel=k, planner_us=planner[measure], best_us=fastest[measure],
                        speedup=planner[measure] / fastest[measure] if fastest[measure] > 0 else math.nan,
                        variant=fastest["variant"], measure=measure))
    return out


def _brief(name: str, p: dict) -> str:
    keys = ("BLOCK_B", "BLOCK_K", "BLOCK_F") if name == "retrieve" else ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUPS",
                                                                          "TILES", "SPB")
    inner = ",".join(f"{k.replace('BLOCK_', '')}={p[k]}" for k in keys if k in p)
    return f"[{name} grid={tuple(p['grid'])} {inner} w{p['num_warps']} s{p['num_stages']}]"


class Writer:
    def __init__(self, out: Path, doc: dict):
        self.out, self.doc = out, doc
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        from benchmarks._pairs import record_json  # a config's error is inf when its output is not finite

        self.doc["best"] = best_variants(self.doc["results"])
        for name, text in (("gpu_sweep.json", record_json(self.doc, indent=1, default=str)),
                           ("gpu_sweep.txt", table(self.doc))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_sweep", description=__doc__.splitlines()[0],
                                 formatter_class=_cli.HelpFormatter)
    ap.add_argument("--budget", type=_cli.non_negative_float, default=60.0, help="wall seconds in all (default 60)")
    ap.add_argument("--margin", type=_cli.non_negative_float, default=2.5,
                    help="start a config only with this many seconds left")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_sweep.json and gpu_sweep.txt")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated dtypes")
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    ap.add_argument("--device", default="cuda",
                    help="cuda, cuda:I (default cuda) or cpu (Triton interpreter: a test)")
    ap.add_argument("--dry-run", action="store_true", help="plan every config on meta tensors, check, estimate")
    ap.add_argument("--lower", type=int, default=None, metavar="ARCH",
                    help="with --dry-run: compile each config for sm_ARCH (e.g. 90; no GPU needed), record spills")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU tests)")
    ap.add_argument("--max-configs", type=_cli.positive_int, default=None, help="run at most this many configs")
    ap.add_argument("--workers", type=_cli.non_negative_int, default=None,
                    help="processes compiling configs ahead into Triton's cache (default on CUDA: "
                         "min(8, CPUs - 4); else 0)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # I/N: run as compile-ahead worker I of N
    args = ap.parse_args(argv)
    if problem := _cli.output_problem(args.out, folder=True):
        ap.error(f"--out: {problem}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):  # not torch.device's error after the imports
        ap.error(f"--device: {args.device!r}; expected cuda, cuda:I (a GPU's index) or cpu")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"bfloat16", "float16", "float32"}:
        ap.error(f"--dtypes: {args.dtypes!r}; expected bfloat16, float16 and/or float32")
    try:
        batches = [_cli.positive_int(b) for b in args.batches.split(",")]
    except argparse.ArgumentTypeError as exc:
        ap.error(f"--batches: {exc}")
    for flag, values in (("--dtypes", dtypes), ("--batches", batches)):  # each config would be scheduled twice
        if problem := _cli.repeated_problem(flag, values):
            ap.error(problem)
    t_start = time.monotonic()
    deadline = t_start + args.budget

    import torch

    workload = _workload(args.tiny)
    device = torch.device("meta" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device (use --dry-run or --device cpu)", file=sys.stderr)
        return 2
    todo = schedule(dtypes, batches, workload["tokens"])
    if args.max_configs is not None:
        todo = todo[:args.max_configs]
    if args.worker:
        return _worker(args.worker, todo, workload, device, deadline)
    n_workers = args.workers
    if n_workers is None:
        n_workers = min(8, max(0, (os.cpu_count() or 1) - 4)) if device.type == "cuda" else 0
    if args.dry_run or len(todo) <= WORKER_SKIP:
        n_workers = 0
    doc = {
        "schema": SCHEMA, "mode": "dry-run" if args.dry_run else "run",
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running", "budget_s": args.budget, "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine(device),
        "workload": {k: workload[k] for k in ("tokens", "d_in", "d_out", "rank", "slots", "slices", "slice_offsets",
                                              "separation", "scale", "seed") if k in workload},
        "timing": {
            "method": (f"CUDA graph of {CALLS} back-to-back launches, replay timed by CUDA events, median of {REPS}; "
                       "warm_us: inputs L2-resident; flushed_us: graph of (zero 2 x L2, launch) pairs minus "
                       "flush-only graph, median of per-replay differences" if device.type == "cuda" else
                       "wall clock (Triton interpreter on CPU: a test of the code path, not a GPU figure)"
                       if device.type == "cpu" else "none (dry run: planning only)"),
            "calls_per_graph": CALLS, "reps": REPS, "tolerance_vs_planner": {d: tolerance(d) for d in dtypes},
        },
        "compile_ahead_workers": n_workers, "cases": {}, "results": [], "not_run": [],
    }
    writer = Writer(args.out, doc)
    writer.write()
    # An outer `timeout` (SIGTERM) ends the run through the finally below: workers stopped, JSON kept.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # The timer allocates on the device first: this process holds its CUDA context before any worker
    # (were the GPU in an exclusive compute mode, the workers would fail, not the sweep).
    timer = Timer(device) if device.type != "meta" else None
    if timer is not None and timer.flush_error:
        doc["timing"]["flush_error"] = timer.flush_error
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workers = _start_workers(args, n_workers, deadline - time.monotonic()) if n_workers else []
    try:
        cases: dict = {}
        for index, (d, b, v) in enumerate(todo):
            if not args.dry_run and time.monotonic() + args.margin > deadline:
                doc["not_run"] = [{"dtype": d2, "batch": b2, "kernel": v2.kernel, "variant": v2.name}
                                  for d2, b2, v2 in todo[index:]]
                doc["status"] = "timeout"
                break
            try:
                case = cases.get((d, b))
                if case is None:
                    case = cases[(d, b)] = _new_case(workload, d, b, device, sync, doc)
                if args.dry_run:
                    rec = _dry(case, v, args.lower)
                else:
                    rec = run_config(case, v, timer, sync)
            except Exception as exc:  # noqa: BLE001 - one config's failure costs only itself
                rec = {"dtype": d, "batch": b, "kernel": v.kernel, "variant": v.name, "rank": v.rank,
                       "override": v.override, "status": "error", "error": _short(exc),
                       "traceback": traceback.format_exc()[-2000:]}
            rec["t_s"] = round(time.monotonic() - t_start, 2)
            doc["results"].append(rec)
            doc["elapsed_s"] = time.monotonic() - t_start
            writer.write()
        else:
            doc["status"] = "ok"
    finally:
        signal.signal(signal.SIGTERM, previous)
        if workers:
            doc["workers"] = _stop_workers(workers)
        if doc["status"] == "running":  # left by an exception or a signal, not by the loop
            doc["status"] = "interrupted"
            doc["elapsed_s"] = time.monotonic() - t_start
            writer.write()
    doc["elapsed_s"] = time.monotonic() - t_start
    if args.dry_run:
        doc["estimate_s"] = EST_SETUP_S + EST_CONFIG_S * len(doc["results"])
        doc["estimate_with_workers_s"] = EST_SETUP_S + max(EST_RUN_S, EST_CONFIG_S / (1 + GPU_WORKERS)) * len(
            doc["results"])
        bad = [r for r in doc["results"]
               if r["status"] not in ("planned", "same_as_planner", "same_as_earlier", "compile_error")]
        doc["status"] = "ok" if not bad else "failed"
    writer.write()
    print(table(doc), end="")
    return 0 if doc["status"] in ("ok", "timeout") else 1


def _new_case(workload, d, b, device, sync, doc) -> Case:
    import torch

    from mira_kernels import reference

    case = make_case(workload, d, b, device)
    case.y, case.planner, _ = plan(case)
    info = {"shapes": case.shapes, "planner": {launch.name: params(launch) for launch in case.planner}}
    if device.type != "meta":
        with torch.no_grad():
            res = run_launches(case.planner, case.planner, sync)
            if res:
                info["planner_resources"] = res
            i = case.inputs
            want = reference.mira_linear(*(i[k].double() for k in ("x", "weight", "bias")), i["x"][:, 0].double(),
                                         *(i[k].double() for k in ("keys", "bank_a", "bank_b")), **case.opts)
            info["planner_rel_err_vs_float64"] = _rel_err(case.y, want)
    doc["cases"][f"{d} B={b}"] = info
    return case


def _dry(case: Case, v: Variant, lower: int | None) -> dict:
    rec, _, launches, target = prepare(case, v)
    if "status" in rec:
        return rec
    rec["status"] = "planned"
    if lower:  # compile for sm_<lower> without a GPU: does Triton take the config, does it spill
        from mira_kernels.triton import lowering

        for launch in launches if target is None else [_launch(launches, target)]:
            t0 = time.monotonic()
            try:
                low = lowering.compile_launch(launch, lower)
                rec.setdefault("lowered", {})[launch.name] = dict(
                    arch=lower, registers=low.registers, stack=low.stack, local=low.local, shared=low.shared,
                    wgmma=low.wgmma, mma=low.mma, compile_s=round(time.monotonic() - t0, 2))
            except Exception as exc:  # noqa: BLE001 - the GPU run would record a compile error here
                rec.update(status="compile_error", error=_short(exc))
    return rec


if __name__ == "__main__":
    sys.exit(main())
