"""Launch configurations of the MIRA Triton kernels: a small table keyed on shapes and dtype.

No autotuning: a tuning run would launch candidate kernels at first use (slow, and not
capturable in a CUDA graph) and differs between runs. The table is written for ViT-B/16
(T=197, d=768, qkv 768 -> 2304, r=4..64, N up to 256, B 1..256) on sm_80 / sm_90, and every entry
is compiled ahead of time for both targets by ``tests/triton`` (no spills, shared memory fits).

Tile choices, with H100 (132 SMs) in mind:
- the fused projection GEMM uses 64-row tiles while M = B*T is small (B=1: M=197 gives 4 x 36 =
  144 tiles of 64 x 64, about one wave), 128 x 128 x 64 with 8 warps once M is large;
- fp32 x uses 32-wide K steps (twice the bytes per element), fp64 small tiles (DMMA m8n8k4);
- the memory side (mixing, scores) uses 16-sample tiles, the smallest ``tl.dot`` accepts, and
  sizes its column chunks so an (N_PAD, chunk) bank tile stays at 32 KiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Largest slot count the Triton path runs (weights of 16 samples x N_PAD slots live in
#: registers; the lowering sweep is spill-free up to N_PAD = 256, and N = 512 spills in the
#: scores backward). Larger memories fall back to the reference.
MAX_SLOTS = 256

#: Per-tile dot operands are padded to this (the smallest K/N a 16-bit ``tl.dot`` lowers for).
MIN_DOT = 16

#: Programs a split loop aims for: two waves on a 132-SM H100 / H200. Grids never read the
#: device's SM count (see :func:`split_for`).
TARGET_PROGRAMS = 2 * 132


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of the fused projection GEMM (``_mira_linear_fwd_kernel``)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowConfig:
    """Tiles of the row kernels (shrink, adapter expand, per-sample reductions)."""

    block_m: int
    block_k: int
    num_warps: int


@dataclass(frozen=True)
class MemoryConfig:
    """Tiles of the memory-side kernels (mix, scores backward, keys backward, bank backward)."""

    block_b: int
    block_k: int
    block_f: int
    n_pad: int
    num_warps: int
    grad_k: int = 32  # d_k chunk of the dquery / dkeys programs


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def padded(n: int) -> int:
    """n rounded up to a power of two, at least :data:`MIN_DOT` (r, N and S*r inside ``tl.dot``)."""
    return max(MIN_DOT, next_pow2(n))


def gemm_config(m: int, n_out: int, k: int, dtype: torch.dtype, precision: str = "tf32") -> GemmConfig:
    """Config of the fused GEMM for an (m, k) @ (k, n_out) product of x's dtype.

    ``precision`` is the fp32 dot precision: "ieee" runs on the FMA units (no tensor cores), whose
    operand layouts need smaller tiles to stay clear of spills.
    """
    if dtype == torch.float64:
        return GemmConfig(32, 32, 16, 8, 4, 2)
    if dtype == torch.float32:
        if precision == "ieee":
            # 8 warps: the expand's per-sample accumulator (a second 64x64 fp32 tile, 25815fe) spilled 8 bytes
            # on sm_80 at r=64, N=256 with 4; halving each thread's share of both tiles keeps every case at 0.
            return GemmConfig(64, 64, 16, 8, 8, 2)
        if m <= 2048:
            return GemmConfig(64, 64, 32, 8, 4, 3)
        return GemmConfig(128, 128, 32, 8, 8, 3)
    if m <= 512:
        return GemmConfig(64, 64, 64, 8, 4, 4)
    if m <= 4096:
        return GemmConfig(128, 64, 64, 8, 4, 4)
    return GemmConfig(128, 128, 64, 8, 8, 3)


def adapter_config(dtype: torch.dtype, precision: str = "tf32") -> GemmConfig:
    """Config of the in-place expand (memory bound: one read-modify-write of the slices)."""
    if dtype == torch.float64 or precision == "ieee":
        return GemmConfig(32, 64, 0, 0, 4, 2)
    return GemmConfig(64, 64, 0, 0, 4, 2)


def row_config(j_pad: int, dtype: torch.dtype, precision: str = "tf32") -> RowConfig:
    """Config of the row kernels with a (block_m, j_pad) accumulator (shrink, per-sample reductions)."""
    if j_pad >= 256:  # S*r > 128: a (32, 256) accumulator; 16-wide K steps and 8 warps keep it spill-free
        return RowConfig(32, 16, 8)
    if precision == "ieee" and j_pad >= 128:  # FMA dot operands held per thread: smallest tile
        return RowConfig(16, 32, 4)
    if dtype == torch.float64 or precision == "ieee":
        return RowConfig(32, 32, 4)
    if j_pad == 64:  # 3xTF32 doubles the operands' registers: 8 warps share them (4 spill on sm_80)
        return RowConfig(32, 32, 8)
    if j_pad >= 128:  # here 8 warps spill on sm_90 and 4 do not (ptxas heuristics; the sweep decides)
        return RowConfig(32, 32, 4)
    return RowConfig(64, 64, 4)


def factor_config(j_pad: int, dtype: torch.dtype, precision: str = "tf32") -> RowConfig:
    """Config of the per-sample reductions over T: block_m = columns per program, block_k = T step."""
    if j_pad >= 128 or dtype == torch.float64 or (precision == "ieee" and j_pad >= 64):
        return RowConfig(16, 32, 4)
    if j_pad >= 32:
        return RowConfig(32, 32, 4)
    # 32-token steps: with 64-bit row offsets a 64-token step spills 8 bytes (sm_80, 3xTF32).
    return RowConfig(64, 32, 4)


def memory_config(n_slots: int, dtype: torch.dtype, precision: str = "tf32") -> MemoryConfig:
    """Tiles of the memory-side kernels for N slots (padded to n_pad, held per 16-sample tile).

    Chosen from an ahead-of-time sweep (sm_80 and sm_90, N = 30, 100, 256): 8 warps, the
    scores' d_k step block_k = 16 (3xTF32 splits each operand in two, doubling its registers),
    mixing column chunks of 64 for n_pad <= 64 and 32 above; dquery / dkeys d_k chunks of 32.
    IEEE fp32 dots (FMA units, operands held per thread) need 16-wide d_k chunks, and 16-wide
    mixing chunks from n_pad = 128.
    """
    n_pad = padded(n_slots)
    if dtype == torch.float64:
        return MemoryConfig(block_b=16, block_k=16, block_f=16, n_pad=n_pad, num_warps=8, grad_k=16)
    if precision == "ieee":
        block_f = 64 if n_pad <= 64 else 16
        return MemoryConfig(block_b=16, block_k=16, block_f=block_f, n_pad=n_pad, num_warps=8, grad_k=16)
    block_f = 64 if n_pad <= 64 else 32
    return MemoryConfig(block_b=16, block_k=16, block_f=block_f, n_pad=n_pad, num_warps=8, grad_k=32)


def split_for(programs: int, chunks: int) -> int:
    """How many programs share a long loop (e.g. a reduction over the banks' columns) so that about
    :data:`TARGET_PROGRAMS` programs run. A constant, not the device's SM count: the split fixes the
    order of a reduction's partial sums, so results are bitwise equal across devices (an H100 SXM
    with 132 SMs, a PCIe card with 114, a MIG slice)."""
    if programs <= 0 or chunks <= 0:
        return 1
    want = max(1, (TARGET_PROGRAMS + programs - 1) // programs)
    return max(1, min(want, chunks))
