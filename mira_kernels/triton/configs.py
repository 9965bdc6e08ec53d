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

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

#: Per-tile dot operands are padded to this (the smallest K/N a 16-bit ``tl.dot`` lowers for).
MIN_DOT = 16

#: Programs a split loop aims for: two waves on a 132-SM H100 / H200. Grids never read the
#: device's SM count (see :func:`split_for`).
TARGET_PROGRAMS = 2 * 132


#: Launch parameters forced by :func:`overriding`; the bottom entry (no overrides) is the product's.
_OVERRIDES: list[dict] = [{}]


@contextlib.contextmanager
def overriding(*, gemm: dict | None = None, gemm_groups: int | None = None, retrieve: dict | None = None,
               retrieve_split: int | None = None, fold: bool | None = None, tma: bool | None = None,
               persistent: bool | int | None = None):
    """Plans made inside use these launch parameters instead of the table's: for tuning sweeps
    (``benchmarks.gpu_sweep``) only; the ops never enter it. ``gemm``: fields of
    :class:`FusedConfig` (samples_per_block and j_pad follow block_m); ``gemm_groups``: the
    programs per row block (at most the column tiles); ``retrieve``: fields of
    :class:`RetrieveConfig`; ``retrieve_split``: column shares per sample tile (at most the
    chunks); ``fold``: False gives the shrink its own launch where the planner folds it into the
    GEMM; ``tma``: True loads the projection GEMM's x and W tiles, and stores its output tiles,
    through TMA tensor descriptors where the operands allow it (:func:`.launchers.tma_descriptors`;
    ``make gpu-check`` times it); ``persistent``: True launches that GEMM with
    :data:`PERSISTENT_PROGRAMS` programs walking its work items (row block, column group) instead of
    one program per item, a positive int with that many (``make gpu-check`` passes the device's SM
    count: an H100 PCIe has 114, and 132 programs there would run a second, 18-program wave).
    Not thread-safe: the override is process-wide while the block runs.
    """
    if persistent is not None and not isinstance(persistent, bool) and not (
            isinstance(persistent, int) and persistent > 0):
        raise ValueError(f"persistent: expected True, False or a positive number of programs, got {persistent!r}")
    for name, fields, cls in (("gemm", gemm, FusedConfig), ("retrieve", retrieve, RetrieveConfig)):
        unknown = set(fields or ()) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{name}: no such field(s) {sorted(unknown)} in {cls.__name__}")
    _OVERRIDES.append(dict(gemm=gemm, gemm_groups=gemm_groups, retrieve=retrieve, retrieve_split=retrieve_split,
                           fold=fold, tma=tma, persistent=persistent))
    try:
        yield
    finally:
        _OVERRIDES.pop()


def forced_unfolded() -> bool:
    """Whether :func:`overriding` asks for the shrink's own launch (a sweep's diagnostic)."""
    return _OVERRIDES[-1].get("fold") is False


def forced_tma() -> bool:
    """Whether :func:`overriding` asks for the GEMM's TMA main loop (a measurement's opt-in)."""
    return _OVERRIDES[-1].get("tma") is True


#: Programs of a persistent GEMM launch: the SM count of an H100 SXM / H200 (one 8-warp program per
#: SM; a fixed count, so that plans do not read the device).
PERSISTENT_PROGRAMS = 132


def persistent_programs() -> int | None:
    """The programs of the persistent GEMM launch :func:`overriding` asks for (a measurement's
    opt-in), or None: one program per work item."""
    asked = _OVERRIDES[-1].get("persistent")
    if asked is True:
        return PERSISTENT_PROGRAMS
    return None if asked is None or asked is False else asked


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused projection GEMM (``_mira_gemm_kernel``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    samples_per_block: int = 1  # samples a BLOCK_M-row window can touch (T-dependent)
    j_pad: int = MIN_DOT  # stacked adapter columns (samples_per_block * S*r), padded for tl.dot


@dataclass(frozen=True)
class RetrieveConfig:
    """Tiles of the retrieval (``_mira_retrieve_kernel``)."""

    block_b: int
    block_k: int
    block_f: int
    slot_chunk: int
    num_warps: int
    #: The cosines' dot precision; None: the precision rule's (launchers). Sweeps set "ieee" (fp32 on
    #: FMA units) for 16-bit x, whose rule says 3xTF32: 28% fewer instructions per d_k element in the
    #: cosine loop (sm_90 SASS), the loop being ~14 of the retrieval's 20 us at B <= 8 (H200 sweep).
    score_precision: str | None = None
    #: The mixing dots' precision; None: the rule's (launchers). Sweeps set "ieee" with small sample
    #: tiles (BLOCK_B < 16), where FMA units do the (BLOCK_B, NC) x (NC, BLOCK_F) product in fewer
    #: instructions than tensor cores' 3xTF32 on a padded tile.
    mix_precision: str | None = None


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
    slot_chunk: int  # slots held per program at once (padded(N) up to 128, else chunks of 128)
    num_warps: int
    grad_k: int = 32  # d_k chunk of the dquery / dkeys programs


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def padded(n: int) -> int:
    """n rounded up to a power of two, at least :data:`MIN_DOT` (r, N and S*r inside ``tl.dot``)."""
    return max(MIN_DOT, next_pow2(n))


def gemm_maxnreg(num_warps: int) -> int | None:
    """Registers per thread a fused-GEMM program of ``num_warps`` may use (PTX ``.maxnreg``).

    Without a bound ptxas caps a 4-warp program near 168 registers (room for three programs per
    SM) and spilled the expand's non-finite marks there (8-72 bytes, sm_80 and sm_90, fp32 and
    16-bit; tests/triton/test_triton_lowering.py); allowing the hardware's 255 fits them (one or
    two programs per SM, as a tensor-core GEMM's tiles want). 8-warp programs get 255 by default
    and a bound made ptxas spill (304 bytes, fp32/TF32 on sm_90), so they keep none.
    """
    return 255 if num_warps <= 4 else None


#: Widest stacked adapter (samples per row block x S*r) whose shrink is folded into the GEMM's
#: main loop; wider ones (large ranks, or short sequences packing many samples in a row block)
#: get a separate shrink launch.
MAX_FUSED_J = 32

#: Up to this many token rows (ViT-B/16 at B <= 2) a forward whose shrink has its own launch (fp16,
#: fp32 and fp64 x, wide adapters) chains its three launches by programmatic dependent launch on
#: Hopper: the shrink starts with the retrieval and waits for its factors, and the GEMM, whose main
#: loop needs neither, starts with both and waits only before its expand. Only where the GEMM's
#: programs are small (64 x 64 tiles of 4 warps, ~23K registers on sm_90) can they share an SM's 64K
#: registers with the retrieval's and the shrink's waiting programs (16K and 12K at B = 1); from 513
#: rows the GEMM's programs take a whole register file (128 x 128 or 128 x 256 tiles of 8 warps), so
#: every SM holding a small program is closed to them, and at B = 8 the small programs alone would
#: hold all 132 SMs: the launches run in turn there, as before.
#: bf16 x keeps its shrink folded into the GEMM at every batch: run beside it instead (tried
#: 2026-12-07), it bought the CUDA graph ~4 pp at B = 1 a priori and ~0.8 pp calibrated to the fourth
#: H200 run (whose retrieval, 20 us, is the chain's critical path), and cost every eager call a third
#: launch (~56 us of host time each in that run, ~21 pp at B = 1); planned only inside a capture, it
#: would make a graph's bits differ from the eager call's.
SHRINK_BESIDE_ROWS = 512

#: Programs the retrieval aims for at small batch: few enough to leave most SMs to the GEMM it
#: overlaps, enough to read the banks with many SMs.
RETRIEVE_PROGRAMS = 64


def samples_per_block(T: int, block_m: int) -> int:
    """Most samples a window of block_m consecutive rows can touch (rows are samples of T tokens)."""
    return min(block_m, -(-(block_m - 1) // max(T, 1)) + 1)


def stacked_width(T: int, j: int, block_m: int) -> int:
    return samples_per_block(T, block_m) * j


def fused_config(m: int, n_out: int, k: int, dtype: torch.dtype, precision: str, T: int, j: int,
                 capability: tuple[int, int] = (9, 0)) -> FusedConfig:
    """The table's :func:`_fused_config`, or the tile :func:`overriding` forces (sweeps only)."""
    cfg = _fused_config(m, n_out, k, dtype, precision, T, j, capability)
    fields = _OVERRIDES[-1].get("gemm")
    if not fields:
        return cfg
    cfg = dataclasses.replace(cfg, **fields)
    spb = samples_per_block(T, cfg.block_m)  # both follow the row tile
    return dataclasses.replace(cfg, samples_per_block=spb, j_pad=padded(spb * j) if j else MIN_DOT)


@functools.cache
def _fused_config(m: int, n_out: int, k: int, dtype: torch.dtype, precision: str, T: int, j: int,
                  capability: tuple[int, int] = (9, 0)) -> FusedConfig:
    """Config of the fused GEMM for an (m, k) @ (k, n_out) product of x's dtype; ``j`` = S*r when the
    shrink is folded into the main loop (0 otherwise); ``capability`` the target generation.

    From the ahead-of-time sweep (tests/triton, ``python -m mira_kernels.triton.lowering``): on
    sm_90 128 x 256 x 32 tiles (bf16; fp16: 128 x 128 x 64) with 8 warps (wgmma) carry the folded
    shrink without spills (m > 512; 64 x 64 x 64 below); on sm_80 (mma.sync, operands in registers) 128 x 128
    tiles spilled 200-260 bytes with the shrink, so 64 x 64 x 64 (8 warps with the shrink, 4
    without). ``precision`` "ieee" (fp32 on the FMA units) and fp64 need smaller tiles.
    """
    if dtype == torch.float64:
        tile = (32, 32, 16, 4, 2)
    elif dtype == torch.float32:
        if precision == "ieee":
            tile = (64, 64, 16, 4, 2)
        else:
            tile = (128, 128, 32, 8, 3) if (m > 2048 and capability >= (9, 0)) else (64, 64, 32, 4, 3)
    elif capability < (9, 0) and j:
        # sm_80 with the shrink folded in: 8 warps (4 left 8-96 bytes of stack at 255 registers).
        tile = (64, 64, 64, 8, 3)
    elif m <= 512 and capability >= (9, 0) and dtype == torch.bfloat16 and j:
        # 64-wide K steps took 9.0 us alone at ViT-B/16 B = 1, 128-wide 8.8; launched with the
        # retrieval (the op's pair) 29.7 vs 26.9 us (H200 sweeps, one tile per program). 253
        # registers, no stack on sm_90 (Triton 3.6 and 3.8).
        tile = (64, 64, 128, 4, 3)
    elif m <= 512 or capability < (9, 0):
        tile = (64, 64, 64, 4, 3)
    elif dtype == torch.bfloat16:
        # 128 x 256 (cuBLAS's tile for these shapes: half the per-tile fill and epilogue per FLOP of
        # 128 x 128, one wave of one-tile programs at ViT-B/16 B = 8) on two warpgroups; 32-wide K
        # steps in 4 stages (64-wide ones left 32 bytes of stack with the folded shrink). fp16 x
        # (fp32 factors, TF32 expand) spilled 96-408 bytes at this tile: it keeps 128 x 128.
        tile = (128, 256, 32, 8, 4)
    else:
        tile = (128, 128, 64, 8, 3)
    spb = samples_per_block(T, tile[0])
    return FusedConfig(*tile, samples_per_block=spb, j_pad=padded(spb * j) if j else MIN_DOT)


#: The fallback of the 128 x 256 tile (:func:`narrow_tile`): fp16's 128 x 128 x 64 tile, 8 warps, 3 stages.
NARROW_TILE = (128, 128, 64, 8, 3)


def one_tile_fits(cfg: FusedConfig, *, tiles: int, in_place: bool, lora: int) -> bool:
    """Whether the table's tile compiles without spills as planned. The 128 x 256 tile (its fp32
    accumulator alone is 128 registers a thread) fits only a program that computes one column tile
    with the shrink folded in or no adapter: the ahead-of-time sweep with Triton 3.8 (sm_90, bf16)
    found it leaving 104-464 bytes of stack in programs of 3 to 9 tiles (ViT-B/16 at B = 256, and
    the backward's dx GEMM with h from its own launch at B = 64) and 64-280 bytes in the in-place
    adapter, where :data:`NARROW_TILE` left none; so did a persistent launch's programs (136-144 bytes at
    B = 64), which walk several work items. A tile forced by :func:`overriding` is kept."""
    if _OVERRIDES[-1].get("gemm") or cfg.block_n < 256:
        return True
    return tiles == 1 and not in_place and lora != 2 and persistent_programs() is None


def narrow_tile(cfg: FusedConfig, T: int, j: int) -> FusedConfig:
    """:data:`NARROW_TILE` in place of ``cfg``'s tile (samples per block and the shrink's padding follow)."""
    spb = samples_per_block(T, NARROW_TILE[0])
    return FusedConfig(*NARROW_TILE, samples_per_block=spb, j_pad=padded(spb * j) if j else MIN_DOT)


def column_groups(m_tiles: int, n_tiles: int, block_n: int, j_pad: int, plain_tiles: int = 0,
                  num_warps: int = 8) -> int:
    """The table's :func:`_column_groups`, or the count :func:`overriding` forces (at most n_tiles)."""
    forced = _OVERRIDES[-1].get("gemm_groups")
    if forced:
        return max(1, min(forced, n_tiles))
    return _column_groups(m_tiles, n_tiles, block_n, j_pad, plain_tiles, num_warps)


@functools.cache
def _column_groups(m_tiles: int, n_tiles: int, block_n: int, j_pad: int, plain_tiles: int = 0,
                   num_warps: int = 8) -> int:
    """How many programs share a row block's column tiles (each takes every GROUPS-th tile).

    Fewer groups compute h fewer times (once per program) and let programs finish the tiles
    without an adapter (``plain_tiles`` of them, visited first) before they wait for the
    retrieval; more groups fill the device. The count minimises, in tile times on a 132-SM device,
    waves x tiles per program x (1 + the program's shrink cost) + one tile time when some program
    starts on an adapted tile (it waits for the retrieval at once: about a tile's time at small
    batch). It reads no device property (the split is a schedule, not a reduction order, but plans
    stay comparable across devices). A wave is one program per SM, two for 4-warp programs (up to
    255 registers x 128 threads: half an SM's register file): at ViT-B/16 B = 1 on the H200, 144
    one-tile programs of 4 warps took 9.0 us where 48 three-tile ones (one wave of one per SM) took 16.3.
    """
    resident = 2 if num_warps <= 4 else 1
    if n_tiles <= 1:
        return 1
    best, best_cost = 1, None
    for groups in range(1, n_tiles + 1):
        tiles = -(-n_tiles // groups)
        if groups > 1 and -(-n_tiles // (groups - 1)) == tiles:
            continue  # same tiles per program as fewer groups: only more programs
        waves = -(-(m_tiles * groups) // (TARGET_PROGRAMS // 2 * resident))
        exposed = 1.0 if (j_pad and groups > plain_tiles) else 0.0
        cost = waves * tiles * (1.0 + j_pad / (block_n * tiles)) + exposed
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = groups, cost
    return best


def retrieve_config(n_slots: int, dtype: torch.dtype, precision: str = "tf32", batch: int = 16) -> RetrieveConfig:
    """The table's :func:`_retrieve_config`, or the fields :func:`overriding` forces (sweeps only)."""
    cfg = _retrieve_config(n_slots, dtype, precision, min(max(int(batch), 1), 16))
    fields = _OVERRIDES[-1].get("retrieve")
    return dataclasses.replace(cfg, **fields) if fields else cfg


#: Elements of the (samples, slots, d_k) product tile that the small-batch retrieval's deferred
#: cosine sums hold across its d_k loop (64 per thread at 4 warps): the d_k step is cut to fit it.
SMALL_BATCH_PRODUCTS = 8192


@functools.cache
def _retrieve_config(n_slots: int, dtype: torch.dtype, precision: str = "tf32", batch: int = 16) -> RetrieveConfig:
    """Tiles of the retrieval for N slots and a batch of ``batch`` samples (16: any larger batch).

    From 16 samples: 16-sample tiles (the smallest tensor-core tl.dot M), one chunk of padded(N)
    slots up to 128 (scores kept in registers), else chunks of 64. Below 16 samples with an fp32
    compute dtype (16-bit and fp32 x): a tile of next_pow2(batch) samples on the FMA units, the cosines
    with their reductions deferred past the d_k loop ("fma", kernels._cosine_sums_deferred) and the
    mixing as an fp32 FMA dot ("ieee"), both at least as accurate as the 3xTF32 they replace. Why: at
    B = 1 15 of the 16 rows were padding and the launch was issue-bound in the cosine loop (H200,
    Nsight Compute: an instruction every 5.3 cycles, one warp per scheduler; ~14 of its ~20 us). The
    sm_90 SASS of that loop, per d_k element (bf16 x, N = 30): 11.2 instructions (3xTF32, 16 rows),
    3.9 (FMA dot, next_pow2(B) rows), 1.8 / 2.1 / 2.8 / 4.1 at B = 1 / 2 / 4 / 8 here (d_k steps of
    64 / 64 / 64 / 32; narrower steps took more per element: 2.5 / 2.9 / 4.6 at 32 / 32 / 16 wide for
    B = 2 / 4 / 8). The fp64 cosines of fp32 x's
    forward and of every backward (launchers bound their d_k step): 2.3 per element at B = 1 (64-wide
    steps) against 53.5 on the 16-row tile (8-wide), 5.1 at B = 8 (16-wide). Counted from instruction
    counts, not yet timed on a GPU (``benchmarks.gpu_sweep`` times both).
    """
    chunk = padded(n_slots) if padded(n_slots) <= 128 else 64
    if batch < 16 and dtype == torch.float32:
        block_b = next_pow2(batch)
        # Chunks above 32 slots (N > 32): half the products and 16 bank columns. The ahead-of-time
        # sweep with Triton 3.8 (N = 256, r = 64) found 32 columns leaving 24 bytes of stack at B = 8 on
        # sm_90 and the full products 8-24 bytes at B = 2 (bf16 x, 64-wide d_k steps) on both targets;
        # this pair none at B = 1 to 8.
        wide = chunk > 32
        products = SMALL_BATCH_PRODUCTS // 2 if wide else SMALL_BATCH_PRODUCTS
        block_k = max(8, min(64, products // (block_b * chunk)))
        block_f = 16 if wide else 64
        return RetrieveConfig(block_b=block_b, block_k=block_k, block_f=block_f, slot_chunk=chunk,
                              num_warps=4, score_precision="fma", mix_precision="ieee")
    if dtype == torch.float64 or precision == "ieee":
        # FMA dots hold their operands per thread. Ahead-of-time sweep (N = 30, r = 128): 64-wide bank
        # chunks left 8 bytes of stack on sm_80 and sm_90, 32-wide 16 bytes on sm_90, 16-wide none; with
        # Triton 3.8, 32-wide also left 8 bytes with 64-slot chunks (N = 256, the fp32 IEEE backward), and
        # 16-wide 8 bytes on sm_80 there: several chunks take 8 warps, as below.
        return RetrieveConfig(block_b=16, block_k=16, block_f=16, slot_chunk=chunk,
                              num_warps=8 if padded(n_slots) > 128 else 4)
    # Several slot chunks (N > 128) with the backward's statistics need 8 warps (4 spill on sm_90).
    multi_chunk = padded(n_slots) > 128
    return RetrieveConfig(block_b=16, block_k=64, block_f=64, slot_chunk=chunk, num_warps=8 if multi_chunk else 4)


def retrieve_split(b_tiles: int, chunks: int) -> int:
    """Column shares per sample tile: about RETRIEVE_PROGRAMS programs at small batch, one share
    per tile once the batch alone gives that many (each share re-reads the keys for its scores)."""
    forced = _OVERRIDES[-1].get("retrieve_split")
    if forced:
        return max(1, min(forced, chunks))
    return max(1, min(chunks, -(-RETRIEVE_PROGRAMS // max(b_tiles, 1))))


@functools.cache
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


def beside_config(j_pad: int, dtype: torch.dtype, precision: str = "tf32", native: bool = False) -> RowConfig:
    """Config of the forward's shrink when it runs beside the GEMM (launches chained,
    :data:`SHRINK_BESIDE_ROWS`): the GEMM waits for it, so its latency counts, not its throughput:
    16-row programs (13 at ViT-B/16 B = 1, where 64 rows made 4), and with bf16 operands taken as
    loaded (``native``) 128-wide K steps (6 dependent steps at d_in = 768 instead of 12; with fp32
    operands and 3xTF32 these spilled 8-48 bytes on sm_90, so they keep 64). Wide adapters, fp64 and
    FMA dots keep :func:`row_config`."""
    if j_pad > 32 or dtype == torch.float64 or precision == "ieee":
        return row_config(j_pad, dtype, precision)
    return RowConfig(16, 128 if native else 64, 4)


@functools.cache
def factor_config(j_pad: int, dtype: torch.dtype, precision: str = "tf32") -> RowConfig:
    """Config of the per-sample reductions over T: block_m = columns per program, block_k = T step."""
    if j_pad >= 128 or dtype == torch.float64 or (precision == "ieee" and j_pad >= 64):
        return RowConfig(16, 32, 4)
    if j_pad >= 32:
        return RowConfig(32, 32, 4)
    # 32-token steps: with 64-bit row offsets a 64-token step spills 8 bytes (sm_80, 3xTF32).
    return RowConfig(64, 32, 4)


@functools.cache
def memory_config(n_slots: int, dtype: torch.dtype, precision: str = "tf32") -> MemoryConfig:
    """Tiles of the backward's memory-side kernels (dw, scores, keys) for N slots.

    Slots are held slot_chunk at a time per 16-sample tile (padded(N) up to 128, else chunks of
    128), so any N runs. From the ahead-of-time sweep (sm_80 and sm_90): 8 warps, bank column chunks
    of 64 for chunks <= 64 and 32 above; dquery / dkeys d_k chunks of 32. IEEE fp32 dots (FMA units,
    operands held per thread) need 16-wide d_k chunks, and 16-wide bank chunks from 128 slots.
    """
    chunk = min(padded(n_slots), 128)
    if dtype == torch.float64:
        return MemoryConfig(block_b=16, block_k=16, block_f=16, slot_chunk=chunk, num_warps=8, grad_k=16)
    if precision == "ieee":
        block_f = 64 if chunk <= 64 else 16
        return MemoryConfig(block_b=16, block_k=16, block_f=block_f, slot_chunk=chunk, num_warps=8, grad_k=16)
    block_f = 64 if chunk <= 64 else 32
    return MemoryConfig(block_b=16, block_k=16, block_f=block_f, slot_chunk=chunk, num_warps=8, grad_k=32)


def split_for(programs: int, chunks: int) -> int:
    """How many programs share a long loop (e.g. a reduction over the banks' columns) so that about
    :data:`TARGET_PROGRAMS` programs run. A constant, not the device's SM count: the split fixes the
    order of a reduction's partial sums, so results are bitwise equal across devices (an H100 SXM
    with 132 SMs, a PCIe card with 114, a MIG slice)."""
    if programs <= 0 or chunks <= 0:
        return 1
    want = max(1, (TARGET_PROGRAMS + programs - 1) // programs)
    return max(1, min(want, chunks))
