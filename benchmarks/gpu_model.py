"""A MODEL (not a measurement) of MIRA on an NVIDIA H200: ViT-B/16 end to end, built from the real launch plans.

``python -m benchmarks.gpu_model`` prices every launch of a ViT-B/16 forward (patch embedding, 12
blocks of LayerNorm, qkv, attention, proj, residuals, MLP, the head) on an H200, for the plain
model and for MIRA on the qkv projection of every block (adapters on Q and V, r = 4, N = 30 slots,
the layer's query and key normalisation included), for B in {1, 8, 64, 256}, in a CUDA graph and
eagerly. MIRA's launches are not written here: they are the GPU backends' own launch plans
(``mira_kernels.launch_plan.describe`` on meta tensors, given the arguments the layer passes: the
memory in the dtypes ``mira.attach`` makes it, x's CLS view as the query), so the model follows the
kernels; the layer's key normalisation and the eager baseline are their code's ATen ops, traced on
meta tensors (:func:`traced_launches`).

Variants: ``plain`` (timm's ViT-B/16), ``triton`` and ``cuda`` (the two GPU backends; a backend
without a planner yet is reported as such), ``unfused`` (the paper-style eager implementation that
make gpu-check measures as its eager baseline, ``benchmarks.eager_mira.EagerMiraLinear``: ATen ops
and cuBLAS, the keys given normalised), and ``vllm-style`` (the peer design: cuBLAS base GEMM, then
a shrink and an expand that adds into the output slices, as vLLM's multi-LoRA ``lora_shrink`` /
``lora_expand`` Triton kernels do, fed by MIRA's retrieval).

How a launch is priced (every constant is a :class:`Machine` field with its source):

- a GEMM-like launch (a cuBLAS GEMM, or a plan record with output tiles): programs of whole tiles
  run in waves over the SMs; a program's time is its FLOPs at the per-SM rate (the measured large
  bf16 GEMM rate over the SMs) plus a per-tile pipeline fill and epilogue; cuBLAS is given the best
  of its common tile shapes for the problem (wave quantisation charged to it too);
- any other launch: the longest of its FLOPs at the unit's rate over the SMs it occupies, its
  device-memory bytes at the bandwidth those SMs can draw (Little's law), its L2 re-reads at the L2
  bandwidth, and its per-program latency (dependent steps x memory latency, per wave);
- launches follow each other with a graph node gap (CUDA graph) or at the host's pace (eager:
  max of the host's and the device's time); a launch with programmatic dependent launch starts
  with its producer and overlaps it up to its ``wait_fraction`` (or the whole waves of its leading
  programs) on the SMs the producer's programs leave free (the model does not see residency:
  registers, shared memory; it assumes a dependent's program never shares an SM with a producer's,
  which is right for the 8-warp GEMM programs and pessimistic for the small ones an unfolded plan
  chains at small batch, ``configs.SHRINK_BESIDE_ROWS``).

Measurements: ``--measured gpu_check.json`` (``make gpu-check``, schema ``mira-gpu-check/1``)
prints the measured per-call times beside the model's, and per kernel class (a MIRA kernel, cuBLAS
GEMMs, an ATen op's kernels: explicit name patterns, ATEN_KERNELS) the measured and modelled sums.

Calibration: a priori, the model priced the stock ViT-B/16 at 0.23-0.77x of what the fourth H200
run measured (fp32 GEMMs were priced on TF32 tensor cores, which PyTorch does not use by default;
every launch was charged ~0.4 us of latency where a small kernel takes ~3 us; the retrieval's
cosine steps were priced as L2 round trips where Nsight Compute shows ~700 issue-bound instructions
each; Triton's GEMM mainloop was priced at cuBLAS's rate). ``--calibrate gpu_check.json`` fits
nine constants (CALIBRATION: a per-launch floor, a device-work scale per dtype, a per-step time per
MIRA backend, the Triton GEMM mainloop's efficiency, three host costs), each to one cell of that
run's model phase, and prints how the model does on every other cell (held out). The fit is end to
end: per kernel the calibrated prices disagree with standalone timings (the fourth run's sweep: the
fused GEMM at B = 64 105 us warm, priced 207 us), so a block's split between kernels is not settled.
The recorded report (``--record``, benchmarks/results/gpu_model.txt) is calibrated to the fourth run,
and ``gpu_check --record``/``--record-from`` writes each new run's own calibrated model_vs_measured.txt.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import _cli
from mira_kernels import launch_plan
from mira_kernels.launch_plan import KernelLaunch

RESULTS = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------------------------
# The machine.
# ----------------------------------------------------------------------------------------------

KINDS = "read on an H200 lent to this project (2026-10-28 and 11-04; PyTorch on the device, not this repo's code)"
H200 = "NVIDIA H200 / H100 SXM datasheet figures"
DOCS = "public figures collected in the project's kernel notes (section 2; the notes are not part of this repository)"


@dataclass(frozen=True)
class Machine:
    """An H200 SXM and the host costs of eager PyTorch. Each value names its source in SOURCES."""

    name: str = "NVIDIA H200 SXM (model)"
    sms: int = 132
    clock_hz: float = 1.98e9
    hbm_bw: float = 4.3e12  # bytes/s, device-to-device copy (read + written)
    bf16_rate: float = 788e12  # FLOP/s, 8192^3 bf16 GEMM through PyTorch, random data
    bf16_peak: float = 989e12  # dense bf16 tensor cores, datasheet
    tf32_peak: float = 494e12
    fp32_peak: float = 67e12  # CUDA cores
    fp64_peak: float = 67e12  # fp64 tensor cores (DMMA)
    l2_bw: float = 10e12  # bytes/s, aggregate L2 -> SM
    sm_inflight: float = 64e3  # bytes one SM keeps in flight to device memory
    dram_latency: float = 0.30e-6  # s, one dependent device-memory round trip (~600 cycles)
    l2_latency: float = 0.13e-6  # s, one dependent L2 round trip (~260 cycles)
    graph_gap: float = 0.6e-6  # s between consecutive kernels of a CUDA graph (empty kernels)
    attention_rate: float = 0.33  # fraction of bf16 peak flash attention reaches at T = 197, d = 64
    host_aten_op: float = 5e-6  # s, one eager ATen op from Python
    host_custom_op: float = 14e-6  # s, the MIRA torch.library op (wrapper, validation, dispatch)
    host_triton_launch: float = 10e-6  # s, one Triton launch from Python
    host_alloc: float = 1.5e-6  # s, one caching-allocator allocation
    host_planning: float = 32e-6  # s, the Triton backend's planning of one qkv call (a stated constant)
    sgemm_rate: float = 67e12 * 0.8  # FLOP/s, cuBLAS fp32 GEMM on CUDA cores (PyTorch's default: no TF32)
    # Calibration (calibrate()): 0 / 1 until fitted to a recorded run.
    launch_floor: float = 0.0  # s of device time every launch costs beyond its priced work
    # s per dependent step of a MIRA kernel's program (a priori: one L2 round trip), per backend.
    step_time_triton: float = 0.13e-6
    step_time_cuda: float = 0.13e-6
    triton_gemm_efficiency: float = 1.0  # the fused Triton GEMM's mainloop rate / the library GEMM's
    work_scale_bf16: float = 1.0  # measured / a-priori device work of 16-bit launches
    work_scale_fp32: float = 1.0  # the same for fp32 launches
    work_scale: float = 1.0  # the scale in force (for_dtype picks one of the two)
    # The layers' per-feature key normalisation (graph replays only: eager inference caches it), per
    # dtype, as KEY_NORM_PATHS names them; as_run() sets them to what a recorded run ran.
    key_norm_bf16: str = "fused"
    key_norm_fp32: str = "fused"
    key_norm: str = "fused"  # the path in force (for_dtype picks one of the two)

    @property
    def sm_rate_bf16(self) -> float:
        return self.bf16_rate / self.sms

    @property
    def efficiency(self) -> float:
        """Fraction of the datasheet tensor-core peak a well-shaped GEMM reaches (measured / datasheet)."""
        return self.bf16_rate / self.bf16_peak

    def for_dtype(self, dtype: torch.dtype) -> Machine:
        """This machine with the device-work scale and key-norm path of x's dtype in force."""
        fp32 = dtype == torch.float32
        return replace(self, work_scale=self.work_scale_fp32 if fp32 else self.work_scale_bf16,
                       key_norm=self.key_norm_fp32 if fp32 else self.key_norm_bf16)

    def gemm_rate(self, unit: str) -> float:
        """Whole-device FLOP/s of a library (cuBLAS) GEMM in the unit's arithmetic."""
        return self.sgemm_rate if unit == "fma_fp32" else self.unit_rate(unit)

    def unit_rate(self, unit: str) -> float:
        """Realistic whole-device FLOP/s of one unit class (launch_plan.UNITS)."""
        return {
            "tc_bf16": self.bf16_rate, "tc_fp16": self.bf16_rate, "tc_tf32": self.tf32_peak * self.efficiency,
            "tc_fp64": self.fp64_peak * self.efficiency, "fma_fp32": self.fp32_peak * 0.5,
            "fma_fp64": self.fp64_peak * 0.25,
        }[unit]


SOURCES = {
    "sms": f"132 multiprocessors, {KINDS}",
    "clock_hz": f"1980 MHz SM clock under load, {KINDS}",
    "hbm_bw": f"device-to-device copy 4.3 TB/s counting bytes read and written, {KINDS}",
    "bf16_rate": f"8192^3 bf16 matmul 769-798 TFLOP/s on random data, {KINDS}",
    "bf16_peak": f"dense bf16 ~989 TFLOP/s, {H200}",
    "tf32_peak": f"dense TF32 = half the bf16 rate, {H200}; used at the measured bf16 GEMM efficiency",
    "fp32_peak": f"~67 TFLOP/s on CUDA cores, {H200}; tl.dot 'ieee' taken at half of it",
    "fp64_peak": "67 TFLOP/s fp64 tensor cores, NVIDIA H100/H200 datasheet (same SM as H100)",
    "l2_bw": "~10 TB/s aggregate L2, public H100 memory-hierarchy summaries (fp4-site.pages.dev "
             "'GPU memory hierarchy'; visualgrok.com 'GPU memory hierarchy'): a lead, not measured here",
    "sm_inflight": "Little's law: ~64 KB in flight per SM over one dram_latency round trip (0.3 us) draws "
                   "~0.21 TB/s, so ~20 SMs saturate HBM; assumption",
    "dram_latency": "~600 cycles HBM3 round trip at 1.98 GHz, public H100 summaries (fp4-site.pages.dev): lead",
    "l2_latency": "~200-260 cycles L2 hit, public microbenchmarks (chipsandcheese 'H100: funny L2'; "
                  "arXiv 2606.22588 for L40): lead",
    "graph_gap": f"~0.6 us between empty kernels in a CUDA graph, {DOCS}",
    "attention_rate": "flash attention at T = 197, head dim 64: ~1/3 of bf16 peak (FlashAttention-2/3 papers "
                      "report 35-60% at sequence lengths >= 512, falling with length); assumption",
    "host_aten_op": f"~5 us per eager ATen op from Python, {DOCS}",
    "host_custom_op": f"~14 us per torch.library custom-op call (measured on this project's CPUs), {DOCS}",
    "host_triton_launch": f"~9-13 us of host time per Triton launch from Python, {DOCS}",
    "host_alloc": "~1-2 us per CUDA caching-allocator allocation (PyTorch): assumption",
    "host_planning": "the Triton backend's planning of one ViT-B/16 qkv call (launchers.plan_linear on CPU tensors, "
                     "measure_host_planning): 31.4-33.4 us on this project's 2-core AMD EPYC, 2026-12-07 (26.7 us "
                     "when the model was recorded before); a constant so that a report does not change with the "
                     "machine printing it (--measure-host-planning times it there instead); the H200 run's host "
                     "not timed (calibrated, host_triton_launch absorbs the difference on its Triton eager cell)",
    "sgemm_rate": f"fp32 GEMM without TF32 (torch.backends.cuda.matmul.allow_tf32 is False by default, and so in "
                  f"every make gpu-check run): ~67 TFLOP/s on CUDA cores, {H200}, at the bf16 GEMM's ~80% efficiency",
    "step_time_triton": "one dependent step (a K step of a loop) of a Triton MIRA kernel's program that is "
                        "neither a GEMM nor memory-bound: a priori one L2 round trip (l2_latency); calibration: fitted "
                        "to a recorded run (Triton bf16 B = 1, CUDA graph; the fourth H200 run's Nsight Compute: the "
                        "retrieval is issue-bound, ~700 SASS instructions a cosine step at ~5 cycles each)",
    "triton_gemm_efficiency": "the fused Triton GEMM's mainloop at this fraction of the rate a library (cuBLAS) "
                              "GEMM gets: a priori 1; calibration: fitted to a recorded run (Triton bf16 B = 256, "
                              "CUDA graph; the fourth H200 run's sweep: the same kernel without adapter 1.5-1.8x "
                              "cuBLAS at B = 64)",
    "step_time_cuda": "the same for the CUDA C++ kernels; calibration: fitted to a recorded run (CUDA C++ bf16 B = 1, "
                      "CUDA graph)",
    "launch_floor": "calibration: fitted to a recorded make gpu-check run (stock bf16 B = 1, CUDA graph), 0 a priori",
    "work_scale_bf16": "calibration: fitted to a recorded run (stock bf16 B = 256, CUDA graph), 1 a priori",
    "work_scale_fp32": "calibration: fitted to a recorded run (stock fp32 B = 256, CUDA graph), 1 a priori",
    "work_scale": "the work scale of the dtype being priced (work_scale_bf16 or work_scale_fp32)",
    "key_norm_bf16": "the layers' code for a 16-bit model (mira.memory._per_feature_unit on the memory's keys, "
                     "16-bit as attach makes them: normalize_columns' one Triton launch since 2026-12-07); a "
                     "recorded run is priced as it ran (as_run: its model phase's layer record)",
    "key_norm_fp32": "the same for a float32 model (one Triton launch since 2026-12-05)",
    "key_norm": "the key-norm path of the dtype being priced (key_norm_bf16 or key_norm_fp32; KEY_NORM_PATHS)",
}

#: The layers' per-feature key normalisation, by the path mira.memory._per_feature_unit takes (a CUDA
#: graph replays it every forward; eager inference takes the derived keys from the memory's cache).
KEY_NORM_PATHS = {
    "fused": "mira_kernels.triton.normalize_columns: one Triton launch, which stores 16-bit keys' result "
             "itself (a cast after it only under the interpreter, which the model never plans)",
    "aten": "mira.memory._unit_columns (the overflow-safe F.normalize, no Triton), its ATen ops traced",
    "f_normalize": "F.normalize(keys, dim=0): norm, clamp, divide (the layers' code before 2026-12-07's "
                   "_unit_columns, and what every H200 run recorded so far ran)",
}

# ----------------------------------------------------------------------------------------------
# Pricing one launch.
# ----------------------------------------------------------------------------------------------

#: Output tiles cuBLAS is given the choice of for a GEMM (its heuristics pick among such kernels).
CUBLAS_TILES = ((128, 256, 64), (256, 128, 64), (128, 128, 64), (64, 128, 64), (64, 64, 64))


def _gemm_time(m: int, n: int, k: int, tile, tiles_per_program: int, programs: int, extra_flops: float,
               out_bytes: int, mach: Machine, sm_rate: float | None = None) -> float:
    """Waves of programs of whole tiles: a tile's MMA time at the per-SM rate, plus a pipeline fill
    (two L2 round trips) and its epilogue store; extra_flops (an adapter) spread over the programs."""
    del m, n
    rate = sm_rate or mach.sm_rate_bf16
    bm, bn, bk = tile
    tile_flops = 2.0 * bm * bn * math.ceil(k / bk) * bk
    # The epilogue's store lands in L2 (write-back): the SM's share of L2 bandwidth.
    tile_time = tile_flops / rate + 2 * mach.l2_latency + bm * bn * out_bytes / (mach.l2_bw / mach.sms)
    program_time = tiles_per_program * tile_time + extra_flops / max(programs, 1) / rate
    waves = math.ceil(programs / mach.sms)
    return waves * program_time + mach.dram_latency


def cublas_time(m: int, n: int, k: int, mach: Machine, out_bytes: int = 2,
                unit: str = "tc_bf16") -> tuple[float, tuple]:
    best = None
    for tile in CUBLAS_TILES:
        programs = math.ceil(m / tile[0]) * math.ceil(n / tile[1])
        t = _gemm_time(m, n, k, tile, 1, programs, 0.0, out_bytes, mach, mach.gemm_rate(unit) / mach.sms)
        if best is None or t < best[0]:
            best = (t, tile)
    return best


@dataclass
class Priced:
    name: str
    kernel: str
    us: float
    bound: str
    launch: KernelLaunch | None = None


def price(k: KernelLaunch, mach: Machine) -> Priced:
    """Device time of one launch alone on the device (no gaps): its a-priori price (below) times the
    calibrated work scale, plus the calibrated per-launch floor."""
    p = _price(k, mach)
    p.us = p.us * mach.work_scale + mach.launch_floor * 1e6
    return p


def _price(k: KernelLaunch, mach: Machine) -> Priced:
    if k.library == "cublas":
        m, n, kk = k.gemm
        unit = next(iter(k.flops), "tc_bf16")
        t, tile = cublas_time(m, n, kk, mach, out_bytes=_out_bytes(k), unit=unit)
        mem = k.bytes / mach.hbm_bw
        return Priced(k.name, k.kernel, max(t, mem) * 1e6, f"tiles {tile[0]}x{tile[1]}", k)
    if k.library in ("aten", "flash"):
        compute = sum(f / (mach.unit_rate(u) * (mach.attention_rate / mach.efficiency if k.library == "flash"
                                                  else 1.0)) for u, f in k.flops.items())
        memory = k.bytes / mach.hbm_bw
        latency = max(k.steps, 1) * mach.dram_latency + mach.l2_latency
        t = max(compute, memory, latency)
        bound = "compute" if t == compute else "memory" if t == memory else "latency"
        return Priced(k.name, k.kernel, t * 1e6, bound, k)
    programs = max(k.programs, 1)
    active = min(programs, mach.sms)
    if k.tile is not None and k.gemm is not None:
        m, n, kk = k.gemm
        extra = max(k.total_flops - _padded_base(k), 0.0)
        # The launch's own arithmetic (an fp32 'ieee' GEMM runs on CUDA cores): its FLOPs over their time.
        seconds = sum(f / mach.unit_rate(u) for u, f in k.flops.items())
        sm_rate = k.total_flops / seconds / mach.sms * mach.triton_gemm_efficiency if seconds > 0 else None
        t = _gemm_time(m, n, kk, k.tile, k.tiles_per_program, programs, extra, _out_bytes(k), mach, sm_rate)
        t = max(t, k.bytes / mach.hbm_bw)
        return Priced(k.name, k.kernel, t * 1e6, f"{programs} programs x {k.tiles_per_program} tiles", k)
    compute = sum(f / mach.unit_rate(u) for u, f in k.flops.items()) * mach.sms / active
    bandwidth = min(mach.hbm_bw, active * mach.sm_inflight / mach.dram_latency)
    memory = k.bytes / bandwidth + k.l2_bytes / (mach.l2_bw * active / mach.sms)
    waves = math.ceil(programs / (2 * mach.sms))
    # Triton kernels are the backend's Python functions (_mira_*); the CUDA C++ ones are mira_*.
    step = mach.step_time_triton if k.kernel.startswith("_") else mach.step_time_cuda
    latency = waves * k.steps * step + mach.dram_latency
    t = max(compute, memory, latency)
    bound = "compute" if t == compute else "memory" if t == memory else "latency"
    return Priced(k.name, k.kernel, t * 1e6, bound, k)


def _out_bytes(k: KernelLaunch) -> int:
    """Bytes per output element of a GEMM-like record (its epilogue's store): the records carry no
    dtype, so its written bytes over its m x n outputs (a stored h, M x 8 fp32, adds < 2%)."""
    m, n, _ = k.gemm
    return max(1, min(8, int(k.bytes_written // max(m * n, 1))))


def _padded_base(k: KernelLaunch) -> float:
    # The base product of a GEMM-like record, as its tiles execute it (the rest is adapter work).
    m, n, kk = k.gemm
    bm, bn, bk = k.tile
    return 2.0 * math.ceil(m / bm) * bm * math.ceil(n / bn) * bn * math.ceil(kk / bk) * bk


def wait_fraction(k: KernelLaunch, mach: Machine) -> float:
    """The part of a PDL launch's time that passes before any of its programs waits for the
    predecessor: each program's own share before its wait (``k.wait_fraction``), or the whole waves
    its leading programs fill (``k.leading_programs``, one program per SM as :func:`_gemm_time`
    schedules them), whichever is longer."""
    if not k.leading_programs or not k.programs:
        return k.wait_fraction
    waves = math.ceil(k.programs / mach.sms)
    return max(k.wait_fraction, (k.leading_programs // mach.sms) / waves)


def sequence_time(launches: list[KernelLaunch], mach: Machine) -> tuple[float, list[Priced]]:
    """Device time (s) of launches in stream order inside a CUDA graph: graph gaps between them,
    except that a launch with programmatic dependent launch starts with its predecessor and
    overlaps it until its wait point."""
    priced = [price(k, mach) for k in launches]
    start = end = 0.0  # the previous launch's start and end
    for i, p in enumerate(priced):
        t = p.us * 1e-6
        if i > 0 and p.launch is not None and p.launch.pdl:
            # Starts with its predecessor (which let it launch at once), runs up to its wait point, and
            # goes on once the predecessor has ended: a chain of such launches (retrieval, shrink, GEMM)
            # overlaps as a whole. While the predecessor runs, its programs hold their share of the SMs
            # (the model cannot tell whether the dependent's would fit beside them: it assumes not).
            wait = wait_fraction(p.launch, mach)
            before = wait * t
            prev = priced[i - 1].launch
            held = min(1.0, prev.programs / mach.sms) if prev is not None and prev.programs else 1.0
            room = (end - start) * (1.0 - held)  # full-device time the dependent gets while it runs
            if before <= room:  # its wait point reached while the predecessor still runs (or at once)
                reached = start + (before / (1.0 - held) if before > 0 else 0.0)
            else:
                reached = end + (before - room)
            end = max(reached, end) + (t - before)
            continue
        start = end + (mach.graph_gap if i > 0 else 0.0)
        end = start + t
    return end, priced


# ----------------------------------------------------------------------------------------------
# ViT-B/16: shapes, launch records, the layer's arguments.
# ----------------------------------------------------------------------------------------------

T, D, HEADS, MLP, PATCHES, CLASSES = 197, 768, 12, 3072, 196, 1000
R, SLOTS, OFFSETS = 4, 30, (0, 1536)


def _aten(name: str, read: float, write: float, flops: float = 0.0, steps: int = 1, unit: str = "fma_fp32",
          library: str = "aten") -> KernelLaunch:
    return KernelLaunch(name=name, kernel=name.split(" ")[0], grid=(), threads=0, flops={unit: flops} if flops else {},
                        bytes_read=read, bytes_written=write, steps=steps, library=library)


def _linear(name: str, m: int, n: int, k: int, xb: int) -> KernelLaunch:
    # fp32: CUDA cores, as PyTorch runs it by default (allow_tf32 False; recorded by every gpu-check run).
    unit = "tc_bf16" if xb == 2 else "fma_fp32"
    return KernelLaunch(name=name, kernel="cublas gemm", grid=(), threads=0, flops={unit: 2.0 * m * n * k},
                        bytes_read=(m * k + k * n + n) * xb, bytes_written=m * n * xb, library="cublas", gemm=(m, n, k),
                        useful_flops=2.0 * m * n * k)


@dataclass
class Op:
    """One PyTorch-level call: its launches and its host time in eager mode. ``graph_only``: run at
    every CUDA-graph replay but not in an eager inference forward, which takes its result from a
    cache (the layers' derived keys: mira/memory.py caches them except under capture)."""

    name: str
    launches: list[KernelLaunch]
    host: float
    mira: bool = False
    graph_only: bool = False


def _meta(shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


#: The memory's bank_dtype in the priced runs: make gpu-check attaches without one
#: (benchmarks/_gpu_check_phases._vit_variants), so banks and keys are in the model's dtype.
BANK_DTYPE: str | None = None


@functools.cache
def layer_memory(dtype: torch.dtype, bank_dtype: str | None = BANK_DTYPE) -> tuple[torch.dtype, torch.dtype, bool]:
    """(keys' dtype, banks' dtype, whether the layer passes x's CLS view x[:, 0] as the query) for MIRA
    attached to a model of ``dtype``, read from the layers' own rules: mira.attach makes each memory in
    the qkv weight's dtype (mira/integration.py), its banks in ``bank_dtype`` where set
    (AdapterMemory._bank_dtype_for), and AdapterMemory.query_token says when the token is the query."""
    from mira import AdapterMemory, MemoryConfig

    memory = AdapterMemory(MemoryConfig(d_in=8, d_k=8, num_slices=2, slice_width=8, rank=2, bank_dtype=bank_dtype),
                           dtype=dtype)
    view = memory.query_token(torch.empty(1, 2, 8, dtype=dtype)) == 0
    return memory.keys.dtype, memory.bank_a.dtype, view


def mira_args(op: str, B: int, dtype: torch.dtype, bank_dtype: str | None = BANK_DTYPE):
    """The op's arguments as the layer passes them for x of ``dtype`` (meta tensors): the memory in
    the dtypes attach makes it, the query x's CLS view where the layer takes it (else the query module's
    output, in the keys' dtype)."""
    keys_dtype, banks_dtype, view = layer_memory(dtype, bank_dtype)
    x = _meta((B, T, D), dtype)
    query = x[:, 0] if view else _meta((B, D), keys_dtype)
    common = (query, _meta((SLOTS, D), keys_dtype), _meta((SLOTS, 2, R, D), banks_dtype),
              _meta((SLOTS, 2, D, R), banks_dtype), list(OFFSETS), "affine", 1.0, 1e-2)
    if op == "mira_linear":
        return (x, _meta((3 * D, D), dtype), _meta((3 * D,), dtype), *common)
    return (_meta((B, T, 3 * D), dtype), x, _meta((3 * D, D), dtype), *common, [True, True, True, False, False])


def plan_records(backend: str, op: str, B: int, dtype: torch.dtype) -> launch_plan.OpPlan | str:
    """The backend's OpPlan, or why there is none."""
    try:
        return launch_plan.describe(backend, op, *mira_args(op, B, dtype), sms=132)
    except ImportError as exc:
        return f"no launch planner yet ({exc.name})"


# ----------------------------------------------------------------------------------------------
# ATen code as launches: traced on meta tensors, so that the model follows the code.
# ----------------------------------------------------------------------------------------------

#: ATen ops that run on cuBLAS (priced as library GEMMs).
GEMM_OPS = ("mm", "bmm", "addmm", "baddbmm")


class _LaunchTrace(TorchDispatchMode):
    """The ATen ops a function dispatches on meta tensors, each that makes a tensor on the device (not a
    view of one) recorded as one launch: its distinct input bytes read, its outputs written."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[KernelLaunch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type == "meta"]
            if outs:
                ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                       and t.device.type == "meta"]
                self.launches.append(_traced_launch(func.overloadpacket.__name__, ins, outs))
        return out


def _distinct_bytes(t: torch.Tensor) -> int:
    # Elements a kernel reads from a (possibly expanded) tensor: its broadcast dims hold one each.
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _gemm_unit(dtype: torch.dtype) -> str:
    # fp32: CUDA cores, as PyTorch runs it by default (allow_tf32 False; recorded by every gpu-check run).
    return {torch.bfloat16: "tc_bf16", torch.float16: "tc_fp16", torch.float64: "tc_fp64"}.get(dtype, "fma_fp32")


def _traced_launch(op: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> KernelLaunch:
    read = float(sum(_distinct_bytes(t) for t in ins))
    written = float(sum(t.numel() * t.element_size() for t in outs))
    if op in GEMM_OPS:
        a, b = ins[-2], ins[-1]  # addmm / baddbmm: (bias or input, a, b)
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        flops = 2.0 * batch * m * n * k
        return KernelLaunch(name=op, kernel=op, grid=(), threads=0, flops={_gemm_unit(a.dtype): flops},
                            bytes_read=read, bytes_written=written, library="cublas", gemm=(batch * m, n, k),
                            useful_flops=flops)
    # Element-wise ops and reductions: about one FLOP per element of the largest operand.
    elements = max(t.numel() for t in ins + outs)
    return KernelLaunch(name=op, kernel=op, grid=(), threads=0, flops={"fma_fp32": float(elements)} if elements else {},
                        bytes_read=read, bytes_written=written, library="aten")


def traced_launches(fn, *args) -> list[KernelLaunch]:
    """The launches ``fn(*args)`` (meta tensors) makes on a GPU, one per ATen op that is not a view."""
    with torch.no_grad(), _LaunchTrace() as trace:
        fn(*args)
    return trace.launches


# ----------------------------------------------------------------------------------------------
# ViT-B/16 as launches.
# ----------------------------------------------------------------------------------------------


def _layer_extras(B: int, dtype: torch.dtype, mach: Machine) -> list[Op]:
    """What the MIRA layer runs before its op (mira/layers.py MiraProjection._fused): the query module
    where the layer does not pass x's CLS view (a cast of the token to the keys' dtype), and the
    per-feature normalisation of the keys across the slots (_key_norm_op)."""
    keys_dtype, _, view = layer_memory(dtype)
    ops = []
    if not view:  # AdapterMemory.make_query: the CLS token in the keys' dtype, the identity query module
        cast = traced_launches(lambda x: x[:, 0].to(keys_dtype), _meta((B, T, D), dtype))
        if cast:
            ops.append(Op("query cast", cast, len(cast) * mach.host_aten_op, True))
    ops.append(_key_norm_op(mach, keys_dtype))
    return ops


@functools.cache
def key_norm_launches(path: str, keys_dtype: torch.dtype) -> tuple[KernelLaunch, ...]:
    """The launches of the layers' per-feature key normalisation of (SLOTS, D) keys on the path
    ``path`` (KEY_NORM_PATHS), from the code each path runs."""
    keys = _meta((SLOTS, D), keys_dtype)
    if path == "fused":
        try:
            from mira_kernels.reference import NORM_EPS
            from mira_kernels.triton import launchers
            from mira_kernels.triton import plan as triton_plan
        except ImportError:
            return key_norm_launches("aten", keys_dtype)  # no Triton: mira.memory takes _unit_columns
        out, launch = launchers.plan_normalize_columns(keys, NORM_EPS)
        # mira_kernels.triton.normalize_columns: out.to(keys.dtype) is a launch only where the kernel
        # wrote float32 (bfloat16 keys under the interpreter; plan_normalize_columns).
        cast = traced_launches(lambda o: o.to(keys_dtype), out) if out.dtype != keys_dtype else []
        return (triton_plan.kernel_launch(launch), *cast)
    if path == "aten":
        from mira.memory import _unit_columns

        return tuple(traced_launches(_unit_columns, keys))
    if path == "f_normalize":
        import torch.nn.functional as F

        from mira_kernels.reference import NORM_EPS

        return tuple(traced_launches(lambda k: F.normalize(k, dim=0, eps=NORM_EPS), keys))
    raise ValueError(f"unknown key-norm path {path!r}; expected one of {sorted(KEY_NORM_PATHS)}")


def _key_norm_op(mach: Machine, keys_dtype: torch.dtype) -> Op:
    """The layer's per-feature key normalisation on the path in force (mach.key_norm): at every graph
    replay, not in eager inference (cached). Its host time is never paid where it is priced."""
    launches = list(key_norm_launches(mach.key_norm, keys_dtype))
    return Op("key norm", launches, 0.0, True, graph_only=True)


def qkv_ops(variant: str, B: int, dtype: torch.dtype, mach: Machine) -> list[Op] | str:
    """The qkv projection of one block as the variant runs it."""
    xb = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    M = B * T
    plain = Op("qkv linear", [_linear("qkv", M, 3 * D, D, xb)], mach.host_aten_op)
    if variant == "plain":
        return [plain]
    if variant == "unfused":
        # The measured eager baseline takes the layer's keys already normalised (gpu_check passes
        # retrieval_keys()): no key norm of the layer's, no query cast; its own steps are all traced.
        launches = list(unfused_launches(B, dtype))
        return [Op("unfused", launches, len(launches) * mach.host_aten_op, True)]
    extras = _layer_extras(B, dtype, mach)
    if variant in ("triton", "cuda"):
        plan = plan_records(variant, "mira_linear", B, dtype)
        if isinstance(plan, str):
            return plan
        n_triton = len(plan.launches) if variant == "triton" else 0
        host = (mach.host_custom_op + n_triton * mach.host_triton_launch + plan.allocations * mach.host_alloc
                + (mach.host_planning if variant == "triton" else 0.0))
        return extras + [Op(f"mira_linear[{variant}]", list(plan.launches), host, True)]
    retrieval = plan_records("triton", "mira_linear", B, dtype)
    if variant == "vllm-style":
        if isinstance(retrieval, str):
            return retrieval
        retrieve = retrieval.launch("retrieve")
        j = 2 * R
        shrink = KernelLaunch("lora_shrink", "lora_shrink (vLLM-style)", (math.ceil(M / 64), 2), 128,
                              {"tc_bf16": 2.0 * M * j * D}, M * D * xb + B * j * D * 2, M * j * 4, steps=6,
                              useful_flops=2.0 * M * j * D)
        expand = KernelLaunch("lora_expand", "lora_expand (vLLM-style, add_inputs)", (math.ceil(M / 64), 24), 128,
                              {"tc_bf16": 2.0 * M * 2 * D * 16}, M * j * 4 + B * j * D * 2 + M * 2 * D * xb,
                              M * 2 * D * xb, steps=3, useful_flops=2.0 * M * j * D)
        host = mach.host_aten_op + mach.host_custom_op + 3 * mach.host_triton_launch
        return extras + [Op("vllm-style", [plain.launches[0], retrieve, shrink, expand], host, True)]
    raise ValueError(variant)


@functools.cache
def unfused_launches(B: int, dtype: torch.dtype) -> tuple[KernelLaunch, ...]:
    """The measured eager baseline's launches for one qkv call (benchmarks.eager_mira.EagerMiraLinear, as
    make gpu-check attaches it: the memory in the dtypes attach makes it), traced from its code: the
    retrieval and mixing in ATen ops, one einsum per step and slice, then the update brought to full
    width (zeros for the K slice, cat) and added to the base linear's output."""
    from benchmarks.eager_mira import EagerMiraLinear

    keys_dtype, banks_dtype, _ = layer_memory(dtype)
    base = torch.nn.Linear(D, 3 * D, device="meta", dtype=dtype)
    layer = EagerMiraLinear(base, _meta((SLOTS, D), keys_dtype), _meta((SLOTS, 2, R, D), banks_dtype),
                            _meta((SLOTS, 2, D, R), banks_dtype), list(OFFSETS), scale=1.0, eps=1e-2)
    return tuple(traced_launches(layer, _meta((B, T, D), dtype)))


def block_ops(variant: str, B: int, dtype: torch.dtype, mach: Machine) -> list[Op] | str:
    xb = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    M = B * T
    act = M * D * xb
    qkv = qkv_ops(variant, B, dtype, mach)
    if isinstance(qkv, str):
        return qkv
    attn_flops = 4.0 * B * HEADS * T * T * (D // HEADS)
    return [
        Op("norm1", [_layer_norm(M, xb)], mach.host_aten_op),
        *qkv,
        # fp32: no flash kernel (16-bit only); SDPA's memory-efficient kernel on CUDA cores.
        Op("attention", [_aten("flash attention", 3 * act, act, attn_flops, steps=4,
                               unit="tc_bf16" if xb == 2 else "fma_fp32", library="flash")], 3 * mach.host_aten_op),
        Op("proj", [_linear("proj", M, D, D, xb)], mach.host_aten_op),
        Op("residual 1", [_aten("add", 2 * act, act, M * D)], mach.host_aten_op),
        Op("norm2", [_layer_norm(M, xb)], mach.host_aten_op),
        Op("fc1", [_linear("fc1", M, MLP, D, xb)], mach.host_aten_op),
        Op("gelu", [_aten("gelu", M * MLP * xb, M * MLP * xb, 8.0 * M * MLP)], mach.host_aten_op),
        Op("fc2", [_linear("fc2", M, D, MLP, xb)], mach.host_aten_op),
        Op("residual 2", [_aten("add", 2 * act, act, M * D)], mach.host_aten_op),
    ]


def _layer_norm(rows: int, xb: int) -> KernelLaunch:
    return _aten("layer_norm", rows * D * xb + 2 * D * xb, rows * D * xb, 8.0 * rows * D)


def model_ops(variant: str, B: int, dtype: torch.dtype, mach: Machine) -> list[Op] | str:
    xb = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    M = B * T
    image = B * 3 * 224 * 224 * xb
    blk = block_ops(variant, B, dtype, mach)
    if isinstance(blk, str):
        return blk
    stem = [
        Op("patch embed", [_aten("im2col", image, B * PATCHES * D * xb), _linear("patch", B * PATCHES, D, D, xb)],
           2 * mach.host_aten_op),
        Op("cls + pos", [_aten("cat", B * PATCHES * D * xb, M * D * xb), _aten("add pos", M * D * xb, M * D * xb)],
           2 * mach.host_aten_op),
    ]
    # timm normalises every token (VisionTransformer.forward_features: self.norm(x)), then pools the
    # CLS row (a view) for the head.
    head = [Op("final norm + head", [_layer_norm(M, xb), _linear("head", B, CLASSES, D, xb)], 2 * mach.host_aten_op)]
    return stem + blk * 12 + head


@dataclass
class Timing:
    graph: float  # s, in a CUDA graph
    eager: float  # s, eager inference: the longer of host and device
    device: float  # s, eager inference's device time (no graph-only ops)
    host: float  # s, eager inference's host time
    launches: int  # in a CUDA graph
    priced: list[Priced] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Calibration against a recorded run.
# ----------------------------------------------------------------------------------------------

#: The cells of a make gpu-check model phase each calibrated constant is fitted to (one each, in this
#: order, repeated until they settle); every other cell is held out and judges the model.
CALIBRATION = (
    ("launch_floor", "plain", torch.bfloat16, 1, "graph", (0.0, 50e-6)),
    ("work_scale_bf16", "plain", torch.bfloat16, 256, "graph", (0.1, 10.0)),
    ("work_scale_fp32", "plain", torch.float32, 256, "graph", (0.1, 10.0)),
    ("step_time_triton", "triton", torch.bfloat16, 1, "graph", (0.0, 20e-6)),
    ("step_time_cuda", "cuda", torch.bfloat16, 1, "graph", (0.0, 20e-6)),
    # The cell's time falls as this one grows: calibrate() finds the direction itself.
    ("triton_gemm_efficiency", "triton", torch.bfloat16, 256, "graph", (0.05, 1.5)),
    ("host_aten_op", "plain", torch.bfloat16, 1, "eager", (0.0, 500e-6)),
    ("host_custom_op", "cuda", torch.bfloat16, 1, "eager", (0.0, 5e-3)),
    ("host_triton_launch", "triton", torch.bfloat16, 1, "eager", (0.0, 5e-3)),
)

# gpu_check names dtypes as torch does ("bfloat16"); the short names are kept for older files.
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
_VARIANTS = {"linear": "plain", "stock": "plain", "eager": "unfused"}  # a measurement's kind -> model variant


def _forward_cell(m: dict) -> tuple[str, torch.dtype] | None:
    """(model variant, dtype) of a timed forward measurement of gpu_check, or None for any other."""
    dtype = _DTYPES.get(m.get("dtype"))
    if m.get("mode") != "forward" or not m.get("ok") or dtype is None:
        return None
    return _VARIANTS.get(m["kind"], m.get("backend")), dtype


def measured_cells(doc: dict) -> dict:
    """{(variant, dtype, B): {"graph": us, "eager": us}} of a gpu_check.json's model phase (forward)."""
    cells = {}
    for m in (doc.get("phases", {}).get("model", {}) or {}).get("measurements", []) or []:
        cell = _forward_cell(m)
        if cell is None:
            continue
        variant, dtype = cell
        cells[(variant, dtype, m["batch"])] = {k: (m.get(f"{k}_us") or {}).get("median") for k in ("graph", "eager")}
    return cells


def modelled(variant: str, B: int, dtype: torch.dtype, mach: Machine) -> Timing | None:
    m = mach.for_dtype(dtype)
    ops = model_ops(variant, B, dtype, m)
    return None if isinstance(ops, str) else time_ops(ops, m)


def calibrate(mach: Machine, doc: dict, rounds: int = 4) -> tuple[Machine, list[str]]:
    """``mach`` with the CALIBRATION constants fitted to a recorded run: each solves model == measured
    on its cell (bisection: every cell's time is monotone in its constant). Returns the machine and a line
    per constant saying what it was fitted to."""
    cells = measured_cells(doc)
    notes = {}
    current = {name: getattr(mach, name) for name in RUN_FIELDS}
    mach = as_run(mach, doc)  # fitted to what the run ran
    for _ in range(rounds):
        for name, variant, dtype, B, mode, (lo, hi) in CALIBRATION:
            want = (cells.get((variant, dtype, B)) or {}).get(mode)
            if want is None:
                notes[name] = f"{name}: not fitted (the run has no {variant} {dtype} B={B} {mode} time)"
                continue

            def at(value, base=mach, name=name, variant=variant, dtype=dtype, B=B, mode=mode):
                t = modelled(variant, B, dtype, replace(base, **{name: value}))
                return (t.graph if mode == "graph" else t.eager) * 1e6

            sign = 1.0 if at(hi) >= at(lo) else -1.0  # the cell's time rises (or falls) with the constant

            def gap(value, at=at, want=want, sign=sign):
                return sign * (at(value) - want)

            if gap(lo) >= 0 or gap(hi) <= 0:
                notes[name] = f"{name}: not fitted (the model cannot reach {want:.1f} us on {variant} B={B} {mode})"
                continue
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
            mach = replace(mach, **{name: 0.5 * (lo + hi)})
            notes[name] = (f"{name} = {getattr(mach, name):.4g}: fitted to {variant} {str(dtype)[6:]} B={B} {mode} "
                           f"{want:.1f} us")
    lines = [notes[name] for name, *_ in CALIBRATION if name in notes]
    other = other_device(mach, doc)
    return replace(mach, **current), ([other] if other else []) + lines


def other_device(mach: Machine, doc: dict) -> str | None:
    """A line saying so when a recorded run's GPU is not the chip the model's constants describe (an
    H200: a lent machine may be an H100, SXM with 132 SMs and 3.35 TB/s or PCIe with 114 and 2.0):
    the fitted constants absorb some of the difference, the bandwidths, peaks and SM count do not."""
    gpu = (doc.get("environment") or {}).get("gpu") or {}
    name, sms = gpu.get("name"), gpu.get("sms")
    if not name or ("H200" in name and sms in (None, mach.sms)):
        return None
    return (f"the run's GPU is {name} ({sms} SMs), the model's constants an H200's ({mach.sms} SMs; SOURCES): "
            "the fits absorb part of the difference, not the bandwidths, peak rates or SM count; "
            "read 'model vs measurement' as across two chips")


#: The Machine fields as_run sets to what a recorded run ran (calibrate gives the caller's back).
RUN_FIELDS = ("key_norm_bf16", "key_norm_fp32", "key_norm")


def as_run(mach: Machine, doc: dict) -> Machine:
    """``mach`` pricing the layers as a recorded run ran them: the key normalisation's path per dtype,
    from the model phase's ``layer`` record. ``key_norm_by_dtype`` (since 2026-12-07) names the path
    mira.memory._per_feature_unit took for each dtype's keys ('fused' or 'aten': _unit_columns); the
    older single ``key_norm`` (2026-12-05 to 07) said 'fused' or 'aten' for F.normalize's three; runs
    before it (all four H200 runs of 2026-12-04) ran F.normalize."""
    layer = ((doc.get("phases") or {}).get("model") or {}).get("layer") or {}
    by_dtype = layer.get("key_norm_by_dtype")
    if by_dtype:
        fields = (("key_norm_bf16", "bfloat16"), ("key_norm_fp32", "float32"))
        paths = {name: by_dtype[dtype] for name, dtype in fields if by_dtype.get(dtype) in KEY_NORM_PATHS}
    else:
        path = "fused" if layer.get("key_norm") == "fused" else "f_normalize"
        paths = {"key_norm_bf16": path, "key_norm_fp32": path}
    return replace(mach, **paths)


def fitted_cells() -> set:
    return {(variant, dtype, B, mode) for _, variant, dtype, B, mode, _ in CALIBRATION}


def time_ops(ops: list[Op], mach: Machine) -> Timing:
    launches = [k for op in ops for k in op.launches]
    graph, priced = sequence_time(launches, mach)
    # Eager inference runs all but the graph-only ops (the layers' derived keys come from a cache).
    eager_ops = [op for op in ops if not op.graph_only]
    device = graph if len(eager_ops) == len(ops) else sequence_time([k for op in eager_ops for k in op.launches],
                                                                      mach)[0]
    host = sum(op.host for op in eager_ops)
    # Eager: the host enqueues ahead of the device; a launch cannot start before the host issued
    # it, so the slower side sets the pace (PDL overlap kept: it is a launch attribute).
    eager = max(host, device)
    return Timing(graph, eager, device, host, len(launches), priced)


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------

BATCHES = (1, 8, 64, 256)
VARIANTS = ("plain", "triton", "cuda", "vllm-style", "unfused")
TARGETS = {1: None, 8: 1.0, 64: 0.4, 256: 0.4}  # % end to end, CUDA graph, bf16 (issue 17)


def floor_us(B: int, dtype: torch.dtype, mach: Machine) -> float:
    """MIRA's floor per forward: the adapter's and the mixing's useful FLOPs at the realistic bf16
    rate (tensor cores, every block), nothing else (banks read under the GEMM, no extra launch)."""
    M = B * T
    per_block = 2.0 * M * 2 * R * (D + D) + 2.0 * B * SLOTS * 2 * R * (D + D) + 2.0 * B * SLOTS * D
    return 12 * per_block / mach.bf16_rate * 1e6


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+7.2f}%"


def report(mach: Machine, dtypes=(torch.bfloat16, torch.float32), batches=BATCHES, measured: dict | None = None,
           before: dict | None = None, calibration: tuple[str, list[str], dict] | None = None) -> str:
    out = [
        "MODEL, NOT A MEASUREMENT: ViT-B/16 forward on an " + mach.name + ", priced from the launch plans.",
        "MIRA on every block's qkv (Q and V adapted, r = 4, N = 30, affine; the memory in the model's dtype, as",
        "mira.attach makes it), the layer's query and key normalisation included. Times in microseconds per",
        "forward; overhead = variant / plain - 1. The key normalisation is charged in the graph columns only:",
        "a CUDA graph recomputes it at each replay, eager inference takes it from mira/memory.py's cache.",
        "Its path per dtype (key_norm_bf16 / key_norm_fp32 below):",
        *(f"  {name}: {text}" for name, text in KEY_NORM_PATHS.items()),
        "unfused: the measured eager baseline (benchmarks/eager_mira.py), its ATen ops traced; it takes its keys",
        "normalised, so no key normalisation of the layer's.",
        "",
    ]
    if calibration:
        run, notes, doc = calibration
        # The held-out cells are printed only with --measured of the same run: name the section, else the flag.
        judged = ("see 'Model vs measurement'" if doc is measured else
                  f"--measured {run} prints how the model does on them")
        out += [f"Calibrated to {run} (each constant solves model = measured on one cell; every other cell",
                f"of that run is held out and judges the model: {judged}):"]
        out += [f"  {line}" for line in notes] + [""]
    else:
        out += ["A priori: not calibrated to any run (--calibrate gpu_check.json fits the calibration constants).", ""]
    out.append("Assumptions (value: source):")
    for key, source in SOURCES.items():
        value = getattr(mach, key)
        out.append(f"  {key} = {value if isinstance(value, str) else format(value, '.4g')}: {source}")
    out.append("")
    for dtype in dtypes:
        dn = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        out.append(f"== End to end, {dn} ==")
        head = (f"{'B':>4} {'variant':<11} {'launches':>8} {'graph us':>11} {'overhead':>9} {'eager us':>11} "
                f"{'overhead':>9} {'host us':>9}  bound (eager)")
        out += [head, "-" * len(head)]
        dmach = mach.for_dtype(dtype)
        for B in batches:
            plain = time_ops(model_ops("plain", B, dtype, dmach), dmach)
            for variant in VARIANTS:
                ops = model_ops(variant, B, dtype, dmach)
                if isinstance(ops, str):
                    out.append(f"{B:>4} {variant:<11} {ops}")
                    continue
                t = time_ops(ops, dmach)
                bound = "host" if t.host > t.device else "device"
                out.append(f"{B:>4} {variant:<11} {t.launches:>8} {t.graph * 1e6:>11.1f} "
                           f"{'' if variant == 'plain' else _pct(t.graph, plain.graph):>9} {t.eager * 1e6:>11.1f} "
                           f"{'' if variant == 'plain' else _pct(t.eager, plain.eager):>9} {t.host * 1e6:>9.1f}  "
                           f"{bound}")
            fl = floor_us(B, dtype, dmach)
            target = TARGETS.get(B)
            out.append(f"{B:>4} {'floor':<11} {'':>8} {plain.graph * 1e6 + fl:>11.1f} "
                       f"{_pct(plain.graph * 1e6 + fl, plain.graph * 1e6):>9}   (useful adapter + mixing FLOPs at "
                       f"the bf16 rate; target {'beside the floor' if target is None else f'<= {target}%'})")
            out.append("")
    out += sensitivity(mach, batches)
    out += qkv_tables(mach.for_dtype(torch.bfloat16), batches, before)
    if measured:
        out += measured_tables(measured, mach, calibrated=bool(calibration) and calibration[2] is measured)
    return "\n".join(out)


#: The model's assumptions lifted one after another (cumulative) in the sensitivity table: what each
#: part of the Triton forward's modelled excess is worth, so that a GPU run knows what to measure first.
WHAT_IF = (
    ("as modelled", {}),
    ("+ fused GEMM mainloop at cuBLAS's rate (triton_gemm_efficiency = 1)", {"triton_gemm_efficiency": 1.0}),
    ("+ MIRA kernels' dependent steps free (step_time_triton = 0)", {"step_time_triton": 0.0}),
    ("+ no per-launch floor, stock launches too (launch_floor = 0)", {"launch_floor": 0.0}),
)


def sensitivity(mach: Machine, batches) -> list[str]:
    """The Triton forward over the stock model (bf16, CUDA graph) with WHAT_IF's assumptions lifted in turn."""
    dtype = torch.bfloat16
    width = max(len(label) for label, _ in WHAT_IF)
    out = ["== What the Triton forward's excess is made of (bf16, CUDA graph, over the stock model; model) ==",
           f"{'assumptions lifted in turn':<{width}} " + " ".join(f"{f'B={B}':>9}" for B in batches)]
    for label, change in WHAT_IF:
        mach = replace(mach, **change)
        dmach = mach.for_dtype(dtype)
        cells = []
        for B in batches:
            triton = model_ops("triton", B, dtype, dmach)
            if isinstance(triton, str):
                cells.append(f"{'-':>9}")
                continue
            plain = time_ops(model_ops("plain", B, dtype, dmach), dmach).graph
            cells.append(f"{_pct(time_ops(triton, dmach).graph, plain):>9}")
        out.append(f"{label:<{width}} " + " ".join(cells))
    out.append(f"{'target (issue 17)':<{width}} " + " ".join(
        f"{'floor' if TARGETS.get(B) is None else f'<= {TARGETS[B]}%':>9}" for B in batches))
    out.append("")
    return out


def qkv_tables(mach: Machine, batches, before: dict | None) -> list[str]:
    """Per kernel of the qkv op, bf16: plain cuBLAS, the Triton plan now, and (given) before."""
    out = ["== The qkv op per kernel, bf16, CUDA graph (model) =="]
    for B in batches:
        base = price(_linear("qkv", B * T, 3 * D, D, 2), mach)
        out.append(f"-- B={B}: plain cuBLAS qkv {base.us:.2f} us ({base.bound})")
        rows = [("now", plan_records("triton", "mira_linear", B, torch.bfloat16))]
        if before and str(B) in before:
            rows.insert(0, ("before", [KernelLaunch(**k) for k in before[str(B)]]))
        for label, plan in rows:
            if isinstance(plan, str):
                out.append(f"   {label}: {plan}")
                continue
            launches = list(plan.launches) if hasattr(plan, "launches") else plan
            total, priced = sequence_time(launches, mach)
            out.append(f"   {label}: {len(launches)} launches, {total * 1e6:.2f} us in a graph "
                       f"({_pct(total * 1e6, base.us)} over cuBLAS)")
            out.append(f"     {'launch':<14} {'grid':>14} {'thr':>4} {'GFLOP':>9} {'useful':>8} {'MB':>8} "
                       f"{'L2 MB':>8} {'steps':>5} {'us':>8}  bound / schedule")
            for p in priced:
                k = p.launch
                out.append(f"     {k.name:<14} {str(k.grid):>14} {k.threads:>4} {k.total_flops / 1e9:>9.4f} "
                           f"{k.useful_flops / 1e9:>8.4f} {k.bytes / 1e6:>8.3f} {k.l2_bytes / 1e6:>8.3f} "
                           f"{k.steps:>5} {p.us:>8.2f}  {p.bound}{_pdl_note(k, mach)}")
    out.append("")
    return out


def _pdl_note(k: KernelLaunch, mach: Machine) -> str:
    return f"  [PDL, waits at {100 * wait_fraction(k, mach):.0f}%]" if k.pdl else ""


def measured_tables(doc: dict, mach: Machine, calibrated: bool = False) -> list[str]:
    """Model vs measurement for every measured cell of a gpu_check.json (schema mira-gpu-check/1)."""
    out = [f"== Model vs measurement ({doc.get('schema')}, started {doc.get('started')}, "
           f"GPU {((doc.get('environment') or {}).get('gpu') or {}).get('name')}) ==",
           "   (xR: model / measured; 'fit': a cell a calibration constant was fitted to, when calibrated to this run)"]
    fitted = fitted_cells() if calibrated else set()
    held_out: list[float] = []
    mach = as_run(mach, doc)  # each cell priced as the run ran it
    for phase in ("op", "model"):
        for m in (doc.get("phases", {}).get(phase, {}) or {}).get("measurements", []) or []:
            cell = _forward_cell(m)
            if cell is None:
                continue
            variant, dtype = cell
            B = m["batch"]
            if variant not in ("plain", "unfused", "triton", "cuda"):
                continue  # measured but not modelled (the reference backend)
            dmach = mach.for_dtype(dtype)
            if phase == "op":
                ops = qkv_ops(variant, B, dtype, dmach)
                ops = ops if isinstance(ops, list) else []
                ops = [op for op in ops if not op.mira or op.name.startswith(("mira", "vllm", "unfused"))] or ops
            else:
                ops = model_ops(variant, B, dtype, dmach)
            if isinstance(ops, str) or not ops:
                continue
            t = time_ops(ops, dmach)
            g = (m.get("graph_us") or {}).get("median")
            e = (m.get("eager_us") or {}).get("median")

            def cell(model_s, got, mode, variant=variant, dtype=dtype, B=B, phase=phase):
                if got is None:
                    return f"model {model_s * 1e6:9.1f} measured       nan"
                tag = " fit" if phase == "model" and (variant, dtype, B, mode) in fitted else "    "
                return f"model {model_s * 1e6:9.1f} measured {got:9.1f} x{model_s * 1e6 / got:5.2f}{tag}"

            out.append(f"  {phase:<5} {m['variant']:<16} {m['dtype']} B={B:<4} graph: {cell(t.graph, g, 'graph')} "
                       f"| eager: {cell(t.eager, e, 'eager')}")
            if phase == "model":
                for mode, model_s, got in (("graph", t.graph, g), ("eager", t.eager, e)):
                    if got and (variant, dtype, B, mode) not in fitted:
                        held_out.append(model_s * 1e6 / got)
            if phase == "op" and m.get("kernels"):
                out += kernel_rows(t.priced, m["kernels"])
    if held_out:
        ratios = sorted(held_out)
        within = sum(1 for r in ratios if 0.8 <= r <= 1.25)
        out.append(f"  model / measured over the {len(ratios)} end-to-end cells not fitted: median "
                   f"{ratios[len(ratios) // 2]:.2f}, range [{ratios[0]:.2f}, {ratios[-1]:.2f}], {within} within "
                   f"0.8-1.25x")
    out.append("")
    return out


#: The profiler's names of library GEMM kernels (cuBLAS, cuBLASLt and the CUTLASS kernels they pick;
#: split-K reductions and GEMVs included: one library GEMM call may launch them).
GEMM_KERNELS = r"nvjet|cutlass|xmma|gemm|gemv|cublas"
#: A MIRA backend's kernel in a profiler name: Triton's by its function (_mira_gemm_kernel), the CUDA
#: C++ ones inside their namespace and template arguments (void mira_cuda::mira_apply_kernel<...>(...)).
MIRA_KERNEL = r"(?<!\w)(_?mira_\w+?_kernel|_normalize_columns_kernel)(?!\w)"
#: ATen kernel classes: (label, the ATen ops the model names its launches by, the profiler's names).
ATEN_KERNELS = (
    ("fill", ("new_zeros", "zeros", "zeros_like", "ones_like", "full", "fill_", "scalar_tensor"),
     r"FillFunctor|Memset"),
    ("copy / cast", ("_to_copy", "copy_", "copy", "clone", "contiguous"), r"copy_kernel|Memcpy"),
    ("cat", ("cat",), r"CatArrayBatchedCopy"),
    ("norm", ("linalg_vector_norm", "norm"), r"Norm\w*Ops"),
    ("sum", ("sum",), r"sum_functor"),
    ("max", ("amax", "max"), r"MaxNanFunctor|MaxOps"),
    ("all", ("all",), r"and_kernel"),
    ("where", ("where",), r"where_kernel"),
    ("clamp", ("clamp_min", "clamp_max", "clamp"), r"clamp"),
    ("compare", ("ge", "gt", "le", "lt", "eq", "ne"), r"compare_scalar_kernel|Compare\w*Functor"),
    ("abs", ("abs",), r"AbsFunctor"),
    ("reciprocal", ("reciprocal",), r"reciprocal"),
    ("bitwise", ("bitwise_and", "bitwise_or", "bitwise_not"), r"Bitwise\w*Functor|bitwise_not"),
    ("add", ("add",), r"CUDAFunctor_add|AddFunctor"),
    ("mul", ("mul",), r"MulFunctor"),
    ("div", ("div",), r"DivFunctor|div_true|div_trunc|div_floor"),
)


def kernel_class(k: KernelLaunch) -> str:
    """The class a modelled launch is compared in (the label :func:`measured_class` gives its kernels)."""
    if k.library is None:
        return k.kernel  # a MIRA backend's own kernel
    if k.library == "cublas":
        return "cuBLAS GEMMs"
    op = k.kernel.removeprefix("at::")
    return next((label for label, ops, _ in ATEN_KERNELS if op in ops), op)


def measured_class(name: str) -> str:
    """The class of a kernel the profiler names ``name``: explicit patterns, never a bare substring of a
    model's launch name (a launch named 'y' matched every ATen kernel with a 'y' in its name)."""
    mira = re.search(MIRA_KERNEL, name)
    if mira:
        return mira.group(1)
    if re.search(GEMM_KERNELS, name, re.IGNORECASE):
        return "cuBLAS GEMMs"
    return next((label for label, _, pattern in ATEN_KERNELS if re.search(pattern, name)), f"other: {name[:40]}")


def kernel_rows(priced: list[Priced], kernels: list[dict]) -> list[str]:
    """The op's measured kernels beside the model's launches, summed per class (per call)."""
    model: dict[str, list[float]] = {}
    for p in priced:
        row = model.setdefault(kernel_class(p.launch), [0.0, 0])
        row[0] += p.us
        row[1] += 1
    measured: dict[str, list[float]] = {}
    for kern in kernels:
        row = measured.setdefault(measured_class(kern["name"]), [0.0, 0.0])
        row[0] += kern["us"]
        row[1] += kern["calls"]
    out = []
    for label in [*model, *(label for label in measured if label not in model)]:
        got, mine = measured.get(label), model.get(label)
        got = f"{got[0]:8.2f} us x{got[1]:g}" if got else "-"
        mine = f"{mine[0]:8.2f} us x{mine[1]}" if mine else "-"
        out.append(f"      {label[:44]:<44} measured {got:<16} model {mine}")
    return out


def measure_host_planning(repeat: int = 200) -> float:
    """Seconds of the Triton backend's planning for one ViT-B qkv call, measured here (CPU tensors)."""
    try:
        from mira_kernels.triton import launchers
    except ImportError:
        return 0.0
    args = [torch.empty(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
            for a in mira_args("mira_linear", 8, torch.bfloat16)]
    launchers.plan_linear(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        launchers.plan_linear(*args)
    return (time.perf_counter() - start) / repeat


def dump_plans(batches) -> dict:
    """The Triton forward plans as JSON (to price an older checkout's kernels with this model)."""
    out = {}
    for B in batches:
        plan = plan_records("triton", "mira_linear", B, torch.bfloat16)
        out[str(B)] = [] if isinstance(plan, str) else [
            {k: v for k, v in asdict(k).items() if k in KernelLaunch.__dataclass_fields__} for k in plan.launches]
    return out


def plans_from_tree(tree: str, batches) -> dict:
    """Run :func:`dump_plans` with another checkout's ``mira_kernels`` (e.g. the commit before the rewrite)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, env_path()]))
    proc = subprocess.run([sys.executable, __file__, "--dump-plans", *map(str, batches)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout)


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__.splitlines()[0],
                                     formatter_class=_cli.HelpFormatter)
    parser.add_argument("--measured", help="gpu_check.json from `make gpu-check`: print model vs measurement")
    parser.add_argument("--calibrate", help="gpu_check.json whose model phase the calibration constants are fitted "
                        "to (launch floor, work scales, host costs; see CALIBRATION)")
    parser.add_argument("--before", help="JSON of older Triton plans (--dump-plans run in that checkout)")
    parser.add_argument("--batches", type=_cli.positive_int, nargs="+", default=list(BATCHES), help="batch sizes")
    parser.add_argument("--record", action="store_true", help="also write benchmarks/results/gpu_model.txt")
    parser.add_argument("--measure-host-planning", action="store_true",
                        help="time the Triton backend's planning on this machine instead of Machine.host_planning's "
                        "stated constant (the report then changes with the machine printing it)")
    parser.add_argument("--dump-plans", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dump_plans is not None:
        print(json.dumps(dump_plans(args.dump_plans or BATCHES)))
        return
    if problem := _cli.repeated_problem("--batches", args.batches):  # each repeat was printed twice
        parser.error(problem)

    def gpu_check_doc(flag: str, path: str) -> dict:
        doc = _cli.read_json(parser, flag, path)
        if not isinstance(doc, dict) or not isinstance(doc.get("phases"), dict):  # a list: AttributeError later
            parser.error(f"{flag} {path}: not a gpu_check.json (a JSON object with 'phases', schema "
                         "mira-gpu-check/1); give the gpu_check.json a `make gpu-check` run wrote")
        return doc

    # The files first: a missing or non-JSON one was a traceback after the model had been set up.
    measured = gpu_check_doc("--measured", args.measured) if args.measured else None
    before = _cli.read_json(parser, "--before", args.before) if args.before else None
    if before is not None and not isinstance(before, dict):  # {batch: launches}: a list was silently ignored
        parser.error(f"--before {args.before}: not a --dump-plans output (a JSON object of batch sizes)")
    if args.calibrate:
        doc = measured if args.measured and Path(args.measured).resolve() == Path(args.calibrate).resolve() else \
            gpu_check_doc("--calibrate", args.calibrate)
    mach = replace(Machine(), host_planning=measure_host_planning()) if args.measure_host_planning else Machine()
    calibration = None
    if args.calibrate:
        mach, notes = calibrate(mach, doc)
        calibration = (args.calibrate, notes, doc)
    text = report(mach, batches=tuple(args.batches), measured=measured, before=before, calibration=calibration)
    print(text)
    if args.record:
        (RESULTS / "gpu_model.txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
