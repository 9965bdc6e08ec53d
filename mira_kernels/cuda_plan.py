"""The CUDA C++ backend's launch plans as :class:`mira_kernels.launch_plan.OpPlan` records (for the GPU model).

The backend's host plan is C++ (``csrc/cuda/mira_kernels.cuh``: ``plan_workspace``, ``adapter_launches``,
``backward_launches``) and its ATen calls are in ``csrc/cuda/mira_cuda.cu``; this module restates both
from shapes, dtypes and strides only, so it runs on ``meta`` tensors without the extension or a GPU.
It must stay in step with the C++: ``tests/test_cuda_plan.py`` compares every kernel launch (name,
grid, dynamic shared memory) with the C++ plan itself, run by the CPU emulation in plan-only mode.

Costs are what the kernels execute (padding and per-block recomputation included; the math's own
FLOPs go in ``useful_flops``). Every product of these kernels runs on the CUDA cores (no tensor cores:
``fma_fp32``, or ``fma_fp64`` for float64 x); the base GEMMs are cuBLAS through ATen and leave tiling
to the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .launch_plan import KernelLaunch, OpPlan

__all__ = ["Dims", "KernelSpec", "kernel_launches", "describe"]

# Constants of csrc/cuda/mira_kernels.cuh (names as there, without the k).
THREADS = 256
LANES = 32
WARPS = THREADS // LANES
TOK_TILE = WARPS  # tokens per block in the token kernels
J_TILE = 8  # adapter rows per register tile
DW_TILE = 4  # slots per block reduction of the partial dw
COLS_PER_BLOCK = THREADS * 4
KEY_CHUNK = 256
SAMPLE_TILE = 8  # most samples one retrieval block mixes
PAIRS_PER_WARP = 2  # score pairs a warp reduces per round
MAX_SLICES = 16
OFFSET_UPLOAD = 256
SMEM_BUDGET = 32 * 1024
MAX_GRID = 2**31 - 1
MAX_ELEMS = 2**58  # mira_cuda::kMaxElems: the bound on every product of sizes the plan forms (size_error)
TREE = int(math.log2(THREADS))  # barrier levels of a block reduction
LANE_TREE = int(math.log2(LANES))

_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
_GEMM_UNIT = {torch.float16: "tc_fp16", torch.bfloat16: "tc_bf16", torch.float32: "fma_fp32", torch.float64: "tc_fp64"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Dims:
    """``mira_cuda::Dims``: the problem's sizes."""

    B: int
    T: int
    d_in: int
    N: int
    d_k: int
    S: int
    r: int
    d_s: int

    @property
    def FA(self) -> int:
        return self.S * self.r * self.d_in

    @property
    def FB(self) -> int:
        return self.S * self.d_s * self.r

    @property
    def SR(self) -> int:
        return self.S * self.r

    @property
    def tiles(self) -> int:
        return _cdiv(self.T, TOK_TILE)

    @property
    def col_chunks(self) -> int:
        return max(1, _cdiv(self.FA + self.FB, COLS_PER_BLOCK))

    @property
    def offset_uploads(self) -> int:
        return _cdiv(self.S, OFFSET_UPLOAD) if self.S > MAX_SLICES else 0

    @property
    def sample_tile(self) -> int:
        B = self.B
        return 1 if B <= 16 else 2 if B <= 32 else 4 if B <= 64 else SAMPLE_TILE

    @property
    def retrieve_blocks(self) -> int:
        return _cdiv(self.B, self.sample_tile) * self.col_chunks


@dataclass(frozen=True)
class KernelSpec:
    """``mira_cuda::LaunchSpec``: one kernel launch, 1-D grid of THREADS-thread blocks."""

    kernel: str
    blocks: int
    smem: int  # dynamic shared memory, bytes


# Static shared memory of each kernel in compute-dtype elements: its __shared__ arrays in mira_kernels.cuh.
# tests/test_cuda_resources.py checks the records' static part against ptxas's report for every instantiation.
_STATIC_SMEM = {
    "mira_offsets_kernel": 0,
    # red (block_sum of the tile, lane_sum of the score pairs), zw_s (scores, then weights), qden_s, qscale_s,
    # kscale_s (score_tile's key scales), st_s (SepStats: denominator, max, sum per sample)
    "mira_retrieve_kernel": SAMPLE_TILE * THREADS + SAMPLE_TILE * KEY_CHUNK + 2 * SAMPLE_TILE + KEY_CHUNK
    + 3 * SAMPLE_TILE,
    "mira_apply_kernel": J_TILE * THREADS,  # red of tile_row_dots
    "mira_bwd_tokens_kernel": J_TILE * THREADS,
    "mira_bwd_factors_kernel": J_TILE * THREADS,
    "mira_bwd_scores_kernel": 2 * THREADS,  # block_sum<2>
    "mira_bwd_memory_kernel": THREADS,
}


def _static_smem_bytes(kernel: str, acc_size: int) -> int:
    # A launch's record adds its dynamic part (KernelSpec.smem) to this.
    return _STATIC_SMEM[kernel] * acc_size


def _spill(d: Dims, acc_size: int, smem_budget: int) -> bool:
    return TOK_TILE * d.SR * acc_size > smem_budget


def _dyn_smem(d: Dims, acc_size: int, smem_budget: int) -> int:
    return 0 if _spill(d, acc_size, smem_budget) else TOK_TILE * d.SR * acc_size


def kernel_launches(op: str, d: Dims, acc_size: int, output_mask=(True,) * 5,
                    smem_budget: int = SMEM_BUDGET) -> list[KernelSpec]:
    """The backend's own kernel launches of ``op``, in order (``adapter_launches`` / ``backward_launches``).

    ``mira_linear`` launches the adapter's kernels after ATen's GEMM; ``mira_adapter_`` the same kernels.
    """
    out: list[KernelSpec] = []
    if d.B == 0:
        return out
    uploads = [KernelSpec("mira_offsets_kernel", 1, 0)] * d.offset_uploads
    smem = _dyn_smem(d, acc_size, smem_budget)
    if op in ("mira_linear", "mira_adapter_"):
        if d.N == 0:  # an empty memory adds exactly zero, x unread: nothing to launch
            return out
        apply = d.T > 0 and d.d_s > 0
        if apply:
            out += uploads
        out.append(KernelSpec("mira_retrieve_kernel", d.retrieve_blocks, 0))
        if apply:
            out.append(KernelSpec("mira_apply_kernel", d.B * d.tiles, smem))
        return out
    if d.N == 0:  # dx is the G W it holds on entry, the memory gradients the glue's zeros
        return out
    need_x, need_q, need_k, need_a, need_b = (bool(m) for m in output_mask)
    mem = need_q or need_k or need_a or need_b  # runs_memory_kernels
    tokens = d.T > 0 and (mem or need_x)
    if tokens or mem:
        out += uploads
    out.append(KernelSpec("mira_retrieve_kernel", d.retrieve_blocks, 0))
    if tokens:
        out.append(KernelSpec("mira_bwd_tokens_kernel", d.B * d.tiles, smem))
    if not mem:
        return out
    out.append(KernelSpec("mira_bwd_factors_kernel", d.B * d.col_chunks, 0))
    out.append(KernelSpec("mira_bwd_scores_kernel", d.B, 0))
    memory_blocks = (d.N * d.col_chunks if (need_a or need_b) else 0) + (d.N if need_k else 0)
    if memory_blocks:
        out.append(KernelSpec("mira_bwd_memory_kernel", memory_blocks, 0))
    return out


# ----------------------------------------------------------------------------------------------
# Cost of each kernel: what it executes and moves, read off its code in mira_kernels.cuh.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    d: Dims
    xs: int  # bytes per element of x (and out, grad_out, weight)
    acc: int  # bytes per element of the compute dtype
    separation: str
    mask: tuple[bool, ...]
    spill: bool

    @property
    def unit(self) -> str:
        return "fma_fp64" if self.acc == 8 else "fma_fp32"


def _rows_dots_steps(j: int, length: int) -> int:
    # tile_row_dots: per register tile of J_TILE rows, a lane-strided loop and a lane tree.
    return _cdiv(j, J_TILE) * (_cdiv(length, LANES) + LANE_TREE + 1)


def _retrieve(c: _Call) -> dict:
    d = c.d
    blocks, tiles, bt = d.retrieve_blocks, _cdiv(d.B, d.sample_tile), d.sample_tile
    # Above KEY_CHUNK keys the scores are streamed: computed twice when the separation needs row statistics.
    stats = c.separation == "softmax" or (c.separation == "affine" and d.N > 1)
    passes = 2 if d.N > KEY_CHUNK and stats else 1
    # Every block recomputes its samples' query norms and scores (q.k and |k|^2 per pair).
    scores = d.col_chunks * d.B * (2.0 * d.d_k + passes * 4.0 * d.N * d.d_k)
    mixing = 2.0 * d.B * d.N * (d.FA + d.FB)
    keys, bank, query = d.N * d.d_k * c.acc, d.N * (d.FA + d.FB) * c.acc, d.B * d.d_k * c.acc
    # Dependent steps: the query norms (one load round, one tree for the tile), the score rounds (a load round
    # and a lane tree for WARPS * PAIRS_PER_WARP pairs), the separation statistics (trees, one sample at a
    # time), the mixing (loads independent of the sums: about one latency per few slots).
    rounds = passes * _cdiv(bt * min(d.N, KEY_CHUNK), WARPS * PAIRS_PER_WARP) * _cdiv(d.N, KEY_CHUNK)
    steps = 1 + TREE + rounds * (2 + LANE_TREE) + (bt * 2 * TREE if stats else 0) + _cdiv(d.N, 4) + 1
    return dict(
        flops={c.unit: scores + mixing},
        bytes_read=query + keys + bank,
        # mixed factors; z, w; the norms and their overflow scales (qnorm, qscale, knorm, kscale)
        bytes_written=d.B * (d.FA + d.FB) * c.acc + (2 * d.B * d.N + 2 * d.B + 2 * d.N) * c.acc,
        # The keys are re-read by every block (once per pass), the banks once per sample tile, each query
        # once per column chunk.
        l2_bytes=keys * (blocks * passes - 1) + bank * (tiles - 1) + query * (d.col_chunks - 1),
        steps=steps,
        useful_flops=2.0 * d.B * d.N * d.d_k + mixing,
        note=f"{bt} sample(s) per block; scores recomputed by each of the {d.col_chunks} column chunks",
    )


def _spill_bytes(c: _Call) -> float:
    d = c.d
    return d.B * d.tiles * TOK_TILE * d.SR * c.acc if c.spill else 0.0


def _apply(c: _Call) -> dict:
    d = c.d
    M = d.B * d.T
    shrink = 2.0 * M * _cdiv(d.SR, J_TILE) * J_TILE * d.d_in
    expand = 2.0 * M * d.S * d.d_s * d.r
    slices = M * d.S * d.d_s * c.xs
    return dict(
        flops={c.unit: shrink + expand},
        bytes_read=M * d.d_in * c.xs + slices,
        bytes_written=slices + _spill_bytes(c),
        l2_bytes=d.B * d.tiles * (d.FA + d.FB) * c.acc + _spill_bytes(c),
        steps=_rows_dots_steps(d.SR, d.d_in) + d.S * _cdiv(d.d_s, THREADS) * d.r,
        useful_flops=2.0 * M * d.SR * d.d_in + expand,
        note="read-modify-write of the output's slices after the base GEMM (x re-read for the shrink)",
    )


def _bwd_tokens(c: _Call) -> dict:
    d = c.d
    need_x, mem = c.mask[0], any(c.mask[1:])
    M = d.B * d.T
    flops = 2.0 * M * d.S * _cdiv(d.r, J_TILE) * J_TILE * d.d_s  # dh
    useful = 2.0 * M * d.SR * d.d_s
    read = M * d.S * d.d_s * c.xs
    written = 0.0
    if mem:
        flops += 2.0 * M * _cdiv(d.SR, J_TILE) * J_TILE * d.d_in  # h
        useful += 2.0 * M * d.SR * d.d_in
        read += M * d.d_in * c.xs
        written += 2.0 * M * d.SR * c.acc
    if need_x:
        flops += 2.0 * M * d.SR * d.d_in
        useful += 2.0 * M * d.SR * d.d_in
        read += M * d.d_in * c.xs
        written += M * d.d_in * c.xs
    steps = d.S * _rows_dots_steps(d.r, d.d_s) + (_rows_dots_steps(d.SR, d.d_in) if mem else 0)
    steps += _cdiv(d.d_in, THREADS) * d.SR if need_x else 0
    return dict(
        flops={c.unit: flops},
        bytes_read=read,
        bytes_written=written + _spill_bytes(c),
        l2_bytes=d.B * d.tiles * (d.FA + d.FB) * c.acc + _spill_bytes(c),
        steps=steps,
        useful_flops=useful,
    )


def _bwd_factors(c: _Call) -> dict:
    d = c.d
    M = d.B * d.T
    cols = d.FA + d.FB
    reduce_t = 2.0 * d.B * d.T * cols
    dw = 2.0 * d.B * d.N * cols
    bank = d.N * cols * c.acc
    return dict(
        flops={c.unit: reduce_t + dw},
        bytes_read=M * d.d_in * c.xs + M * d.S * d.d_s * c.xs + bank,
        bytes_written=d.B * cols * c.acc + d.B * d.col_chunks * d.N * c.acc,
        # x columns are re-read once per adapter row, G's once per rank; h and dh just written; the bank per sample.
        l2_bytes=(d.SR - 1) * M * d.d_in * c.xs + (d.r - 1) * M * d.S * d.d_s * c.xs + 2.0 * M * d.SR * c.acc
        + bank * (d.B - 1),
        steps=d.T + _cdiv(d.N, DW_TILE) * (TREE + 1),
        useful_flops=reduce_t + dw,
    )


def _bwd_scores(c: _Call) -> dict:
    d = c.d
    need_q = c.mask[1]
    flops = 1.0 * d.B * d.N * d.col_chunks + 6.0 * d.B * d.N
    read = d.B * d.col_chunks * d.N * c.acc + 2.0 * d.B * d.N * c.acc
    written = d.B * d.N * c.acc
    if need_q:
        # unit_entry per (sample, slot, element): two products by the scale, a division, an FMA; then the
        # normalisation backward of the query (normalize_backward_inplace). Norms and scales read per slot.
        flops += 5.0 * d.B * d.N * d.d_k + 9.0 * d.B * d.d_k
        read += (d.N * d.d_k + d.B * d.d_k + 2 * d.N + 2 * d.B) * c.acc
        written += d.B * d.d_k * c.acc
    return dict(
        flops={c.unit: flops},
        bytes_read=read,
        bytes_written=written,
        l2_bytes=(d.B - 1) * d.N * d.d_k * c.acc if need_q else 0.0,
        steps=d.col_chunks + 2 * TREE + ((d.N + TREE) if need_q else 0),
        useful_flops=2.0 * d.B * d.N * d.d_k if need_q else 0.0,
    )


def _bwd_memory(c: _Call) -> dict:
    d = c.d
    _, _, need_k, need_a, need_b = c.mask
    cols = (d.FA if need_a else 0) + (d.FB if need_b else 0)
    flops = 2.0 * d.N * d.B * cols + (5.0 * d.N * d.B * d.d_k + 9.0 * d.N * d.d_k if need_k else 0.0)
    read = d.B * cols * c.acc + d.B * d.N * c.acc
    written = d.N * cols * c.acc
    if need_k:
        read += (d.B * d.d_k + d.N * d.d_k + 2 * d.B + 2 * d.N) * c.acc
        written += d.N * d.d_k * c.acc
    return dict(
        flops={c.unit: flops},
        bytes_read=read,
        bytes_written=written,
        l2_bytes=(d.N - 1) * d.B * (d.N + (d.d_k if need_k else 0)) * c.acc,
        steps=d.B + (TREE + 1 if need_k else 0),
        useful_flops=2.0 * d.N * d.B * cols + (2.0 * d.N * d.B * d.d_k if need_k else 0.0),
    )


def _offsets(c: _Call) -> dict:
    return dict(flops={}, bytes_read=0.0, bytes_written=min(c.d.S, OFFSET_UPLOAD) * 8.0, steps=1,
                note=f"S = {c.d.S} slice offsets copied from the launch arguments to the workspace")


_COSTS = {
    "mira_offsets_kernel": _offsets,
    "mira_retrieve_kernel": _retrieve,
    "mira_apply_kernel": _apply,
    "mira_bwd_tokens_kernel": _bwd_tokens,
    "mira_bwd_factors_kernel": _bwd_factors,
    "mira_bwd_scores_kernel": _bwd_scores,
    "mira_bwd_memory_kernel": _bwd_memory,
}

_ROLE = {
    "mira_offsets_kernel": "offsets",
    "mira_retrieve_kernel": "retrieve",
    "mira_apply_kernel": "apply",
    "mira_bwd_tokens_kernel": "bwd_tokens",
    "mira_bwd_factors_kernel": "bwd_factors",
    "mira_bwd_scores_kernel": "bwd_scores",
    "mira_bwd_memory_kernel": "bwd_memory",
}


# ----------------------------------------------------------------------------------------------
# ATen's launches in mira_cuda.cu: the base GEMMs and the conversions around the kernels.
# ----------------------------------------------------------------------------------------------


def _gemm(name: str, kernel: str, m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> KernelLaunch:
    s = _SIZE[dtype]
    flops = 2.0 * m * n * k
    note = "cuBLAS through ATen"
    if dtype == torch.float32:
        note += "; fp32 runs on the FMA pipes unless torch.backends.cuda.matmul.allow_tf32 is set"
    return KernelLaunch(name=name, kernel=kernel, grid=(), threads=0, flops={_GEMM_UNIT[dtype]: flops},
                        bytes_read=(m * k + k * n + (n if bias else 0)) * s, bytes_written=m * n * s,
                        useful_flops=flops, library="cublas", gemm=(m, n, k), note=note)


def _copy(name: str, numel: int, src: torch.dtype, dst: torch.dtype) -> KernelLaunch:
    return KernelLaunch(name=name, kernel="at::copy_", grid=(), threads=0, flops={},
                        bytes_read=numel * _SIZE[src], bytes_written=numel * _SIZE[dst], library="aten",
                        note="dtype conversion or contiguous copy in the glue")


def _memory_copies(tensors: dict[str, torch.Tensor], ct: torch.dtype) -> list[KernelLaunch]:
    # memory_operand(): t.to(ct).contiguous() copies only when the dtype differs or the layout is strided.
    return [_copy(f"{name}_to_compute", t.numel(), t.dtype, ct) for name, t in tensors.items()
            if t.numel() and (t.dtype != ct or not t.is_contiguous())]


def _dims(x, keys, bank_a, bank_b) -> Dims:
    B, T, d_in = x.shape
    N, d_k = keys.shape
    return Dims(B, T, d_in, N, d_k, bank_a.shape[1], bank_a.shape[2], bank_b.shape[2])


def _compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _kernels(op: str, d: Dims, x_dtype: torch.dtype, separation: str, mask) -> list[KernelLaunch]:
    acc = _SIZE[_compute_dtype(x_dtype)]
    call = _Call(d, _SIZE[x_dtype], acc, separation, tuple(bool(m) for m in mask), _spill(d, acc, SMEM_BUDGET))
    launches, uploads = [], 0
    for spec in kernel_launches(op, d, acc, mask):
        cost = dict(_COSTS[spec.kernel](call))
        static = _static_smem_bytes(spec.kernel, acc)  # spec.smem is the dynamic part
        name = _ROLE[spec.kernel]
        if spec.kernel == "mira_offsets_kernel":
            name, uploads = f"offsets{uploads}", uploads + 1
        launches.append(KernelLaunch(name=name, kernel=spec.kernel, grid=(spec.blocks,), threads=THREADS,
                                     smem_bytes=static + spec.smem, **cost))
    return launches


def _check_sizes(d: Dims, op: str) -> None:
    # mira_cuda::size_error: the same products, each at most 2^58 elements (zero when any factor is zero).
    products = [(d.S, d.r, d.d_in), (d.S, d.r, d.d_s), (d.B, d.S, d.r, d.d_in), (d.B, d.S, d.r, d.d_s),
                (d.N, d.S, d.r, d.d_in), (d.N, d.S, d.r, d.d_s), (d.B, d.T + TOK_TILE, d.S, d.r), (d.B, d.T, d.d_in),
                (d.B, d.N), (d.B, d.d_k), (d.N, d.d_k), (d.B, d.N, d.S, d.r, d.d_in + d.d_s)]
    if any(math.prod(p) > MAX_ELEMS for p in products):
        raise ValueError(f"cuda {op}: a product of the sizes would exceed 2^58 elements (64-bit index arithmetic); "
                         "the backend refuses this size")


def _check_grids(launches: list[KernelLaunch], op: str) -> None:
    for k in launches:
        if k.grid and k.grid[0] > MAX_GRID:
            raise ValueError(f"cuda {op}: {k.kernel} would need {k.grid[0]} blocks (> 2^31 - 1); the backend "
                             "refuses this size")


def describe(op: str, *args, sms: int | None = None) -> OpPlan:
    """:class:`OpPlan` of one call of the CUDA C++ backend (arguments as the backend interface; meta tensors).

    ``sms`` is accepted for the protocol and ignored: no grid or reduction order of this backend depends on the
    SM count, so results are bitwise the same on every GPU of one architecture (cuBLAS aside).
    """
    del sms
    if op == "mira_linear":
        x, weight, bias, query, keys, bank_a, bank_b, _offsets_, separation, _scale, _eps = args
        mask = (False,) * 5
    elif op == "mira_adapter_":
        _out, x, query, keys, bank_a, bank_b, _offsets_, separation, _scale, _eps = args
        mask = (False,) * 5
    elif op == "mira_linear_backward":
        grad_out, x, weight, query, keys, bank_a, bank_b, _offsets_, separation, _scale, _eps, mask = args
        mask = tuple(bool(m) for m in mask)
    else:
        raise ValueError(f"unknown op {op!r}")
    d = _dims(x, keys, bank_a, bank_b)
    _check_sizes(d, op)
    ct = _compute_dtype(x.dtype)
    memory = dict(query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    launches: list[KernelLaunch] = []
    allocations = 0
    notes: list[str] = []
    if op == "mira_linear":
        launches.append(_gemm("base_gemm", "at::linear", d.B * d.T, weight.shape[0], d.d_in, x.dtype, bias is not None))
        allocations += 1  # y
        notes.append("16-bit: the base GEMM's output is rounded to x's dtype before the adapter is added")
    if op == "mira_linear_backward" and mask[0]:
        launches.append(_gemm("grad_gemm", "at::matmul", d.B * d.T, d.d_in, weight.shape[0], x.dtype, False))
        allocations += 1  # dx
    kernels = _kernels(op, d, x.dtype, separation, mask)
    if kernels:
        copies = _memory_copies(memory, ct)
        if not x.is_contiguous():
            copies.insert(0, _copy("x_contiguous", x.numel(), x.dtype, x.dtype))
        launches += copies
        allocations += len(copies) + 1  # the copies and the one workspace
    _check_grids(kernels, op)
    launches += kernels
    if op == "mira_linear_backward":
        for need, name, t, shape in zip(mask[1:], ("dquery", "dkeys", "dbank_a", "dbank_b"),
                                        (query, keys, bank_a, bank_b), (query, keys, bank_a, bank_b)):
            if not need:
                continue
            allocations += 1
            if (d.B == 0 or d.N == 0) and shape.numel():  # caller_zeroes_memory_grads: the glue zero-fills
                launches.append(KernelLaunch(name=f"{name}_zero", kernel="at::zeros", grid=(), threads=0, flops={},
                                             bytes_read=0, bytes_written=shape.numel() * _SIZE[ct], library="aten",
                                             note="B = 0 or N = 0: no memory kernel writes it; zero-filled"))
            if t.dtype != ct:  # computed in the compute dtype, returned in the input's
                launches.append(_copy(f"{name}_to_input", shape.numel(), ct, t.dtype))
                allocations += 1
    return OpPlan(backend="cuda", op=op, launches=tuple(launches), allocations=allocations, host_syncs=0,
                  notes=tuple(notes))
