"""What a GPU backend launches for one MIRA op: the backend-neutral description a performance model reads.

Both GPU backends (``triton``: :mod:`mira_kernels.triton`; ``cuda``: ``csrc/cuda``) describe every
op call as an :class:`OpPlan`, a tuple of :class:`KernelLaunch` records, one per kernel launched
(library GEMMs included), in launch order on one stream. ``benchmarks/gpu_model.py`` prices these
records; it never hard-codes a backend's kernels. A plan is built from shapes, strides and dtypes
only, so it is obtained on ``meta`` tensors, with nothing allocated and no GPU::

    from mira_kernels import launch_plan
    plan = launch_plan.describe("triton", "mira_linear", x, weight, bias, query, keys, bank_a, bank_b,
                                slice_offsets, "affine", 1.0, 1e-2)          # x etc. on device="meta"
    for k in plan.launches:
        print(k.name, k.grid, k.threads, k.flops, k.bytes_read, k.bytes_written, k.steps)

**The protocol a backend implements.** :data:`PLANNERS` maps a backend name to a module; that module
has ``describe(op, *args, sms=None) -> OpPlan``, where ``op`` is one of :data:`OPS` and ``args`` are the
op's schema arguments minus the trailing ``backend`` (the order of :mod:`mira_kernels.backends`)::

    mira_linear          x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps
    mira_linear_backward grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale,
                         eps, output_mask
    mira_adapter_        out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps

``sms`` is the multiprocessor count to plan for (grids that depend on it, e.g. split reductions or
persistent grids, must use it; ``None``: the backend's default for planning without a device). The
describe function must take exactly the code path the real call takes (same configs, same grids),
ideally by running the backend's own planner, so the model cannot drift from the kernels.
``describe`` must not read tensor data, synchronise, or allocate device memory.

**What each record must say** (see :class:`KernelLaunch`): the launch's name (unique within the plan),
grid, threads per program, the arithmetic it executes per unit class (padding and redundant
recomputation included: what the hardware does, not what the math needs, which goes in
``useful_flops``), the bytes it reads and writes in device memory (each distinct byte once) and
the further bytes it re-reads that should hit L2, and ``steps``: the number of dependent steps on
its longest program's critical path (a loop iteration whose loads cannot be issued before the
previous iteration's results are used counts one; a pipelined loop of n iterations counts about
n / stages + stages). Library kernels (cuBLAS through ATen) set ``library`` and ``gemm`` and leave
grid/threads to the model. A launch that may start before its predecessor finishes (programmatic
dependent launch, Hopper) sets ``pdl`` and says where it waits (``wait_fraction``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["UNITS", "OPS", "PLANNERS", "KernelLaunch", "OpPlan", "describe", "planner"]

#: Arithmetic classes a launch's FLOPs are split into (one multiply-add counts 2 FLOPs):
#: tensor-core products by operand type (``tc_tf32`` counts each of the three products of a
#: 3xTF32 dot), and the FMA pipes (CUDA cores) in fp32 and fp64.
UNITS = ("tc_bf16", "tc_fp16", "tc_tf32", "tc_fp64", "fma_fp32", "fma_fp64")

OPS = ("mira_linear", "mira_linear_backward", "mira_adapter_")

#: backend name -> module that implements ``describe(op, *args, sms=None) -> OpPlan``.
PLANNERS = {"triton": "mira_kernels.triton.plan", "cuda": "mira_kernels.cuda_plan"}


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch of an op, as the performance model sees it.

    Attributes:
        name: role of the launch, unique within its plan (``"retrieve"``, ``"gemm"``, ``"cublas_linear"``).
        kernel: the kernel function's name (``"_mira_gemm_kernel"``, ``"at::linear"``).
        grid: programs (CTAs) per grid dimension, up to three; ``()`` for library kernels.
        threads: threads per program (Triton: ``num_warps * 32``); 0 for library kernels.
        flops: executed FLOPs per unit class of :data:`UNITS` (missing classes are 0).
        bytes_read: bytes read from device memory, each distinct byte counted once.
        bytes_written: bytes written to device memory.
        l2_bytes: further bytes read that the kernel expects to hit in L2 (tiles re-read by other
            programs, a re-read of an input another launch of the op just wrote).
        steps: dependent steps on the critical path of the longest program (see the module doc);
            the model charges a per-step latency for them.
        useful_flops: the FLOPs the math needs (no padding, no recomputation), for efficiency reports.
        library: ``"cublas"`` (a GEMM through ATen / cuBLAS) or ``"aten"`` (another ATen kernel), else None.
        gemm: (m, n, k) of the main matrix product, for library GEMMs and fused GEMMs alike.
        tile: (BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM-like launch's output tiles, if it has them.
        tiles_per_program: output tiles each program computes in sequence (persistent or grouped
            schedules); 1 for one tile per program.
        pdl: launched with programmatic dependent launch: may start while its predecessor runs.
        wait_fraction: with ``pdl``, the fraction of each program's work done before it waits for
            the predecessor's results (``gdc_wait``); 0 when it waits at once.
        leading_programs: with ``pdl``, programs at the front of the launch order that reach no wait
            before their work is done (their tiles need nothing from the predecessor): while they
            fill the device no program waits. 0 when the launch order puts none first.
        programs_per_sm: programs one SM can hold at once (shared memory and registers), if known.
        smem_bytes: shared memory per program (bytes), if known.
        note: anything a reader of the model's table should know (config, what is redundant).
    """

    name: str
    kernel: str
    grid: tuple[int, ...]
    threads: int
    flops: Mapping[str, float]
    bytes_read: float
    bytes_written: float
    l2_bytes: float = 0.0
    steps: int = 1
    useful_flops: float = 0.0
    library: str | None = None
    gemm: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | None = None
    tiles_per_program: int = 1
    pdl: bool = False
    wait_fraction: float = 0.0
    leading_programs: int = 0
    programs_per_sm: int | None = None
    smem_bytes: int = 0
    note: str = ""

    def __post_init__(self):
        unknown = set(self.flops) - set(UNITS)
        if unknown:
            raise ValueError(f"{self.name}: unknown FLOP classes {sorted(unknown)}; expected some of {UNITS}")
        if any(g < 0 for g in self.grid) or self.steps < 0:
            raise ValueError(f"{self.name}: negative grid or steps")

    @property
    def programs(self) -> int:
        """Programs (CTAs) launched; 0 for library kernels (the model decides their tiling)."""
        n = 1
        for g in self.grid:
            n *= g
        return n if self.grid else 0

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def bytes(self) -> float:
        """Device-memory traffic: bytes read plus bytes written (L2 hits excluded)."""
        return float(self.bytes_read + self.bytes_written)


@dataclass(frozen=True)
class OpPlan:
    """Every launch of one op call, in launch order, and the host-side work that goes with it.

    Attributes:
        backend: ``"triton"`` or ``"cuda"``.
        op: one of :data:`OPS`.
        launches: the kernel launches (library kernels included), in order, on one stream.
        allocations: device tensors the call allocates (outputs and workspaces): each is host
            time in eager mode (the caching allocator), nothing inside a CUDA graph.
        host_syncs: host synchronisations per call; must be 0 (CUDA-graph capture).
        notes: free text: the configuration chosen, what the backend falls back to.
    """

    backend: str
    op: str
    launches: tuple[KernelLaunch, ...]
    allocations: int = 0
    host_syncs: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        names = [k.name for k in self.launches]
        if len(set(names)) != len(names):
            raise ValueError(f"launch names must be unique within a plan, got {names}")

    def launch(self, name: str) -> KernelLaunch:
        for k in self.launches:
            if k.name == name:
                return k
        raise KeyError(f"{self.backend} {self.op}: no launch named {name!r} (have {[k.name for k in self.launches]})")


def planner(backend: str):
    """The module implementing ``describe`` for ``backend`` (ImportError if the backend has none yet)."""
    if backend not in PLANNERS:
        raise ValueError(f"no launch planner for backend {backend!r}; known: {sorted(PLANNERS)}")
    return importlib.import_module(PLANNERS[backend])


def describe(backend: str, op: str, *args, sms: int | None = None) -> OpPlan:
    """The :class:`OpPlan` of ``op`` on ``backend`` for these arguments (use ``meta`` tensors)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    plan = planner(backend).describe(op, *args, sms=sms)
    if not isinstance(plan, OpPlan) or plan.backend != backend or plan.op != op:
        raise TypeError(f"{PLANNERS[backend]}.describe returned {type(plan).__name__} for {backend}/{op}")
    return plan
