"""Launchers of the MIRA Triton kernels: workspaces, grids, configs, and the launch plans.

Every op is first *planned* (outputs and workspaces allocated, one :class:`Launch` per kernel
with its grid, arguments and constexprs) and then run. Plans only read shapes, strides and
dtypes, so the same code plans for real CUDA tensors, for CPU tensors under the Triton
interpreter (tests), and for ``meta`` tensors when the lowering tests compile the exact
launches of the benchmark shapes ahead of time. Grids depend on shapes only and nothing reads
tensor data on the host: the ops can be captured in a CUDA graph.

The forward's plans are replayed from a cache (:mod:`.plan_cache`) keyed on everything the
planner reads: a setting read here (a ``torch.backends`` flag, an environment variable, a module
global) must join ``plan_cache.key`` (``tests/test_host_path.py`` lists the ones read now).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import reference
from . import configs, kernels

SEPARATION_CODES = {name: i for i, name in enumerate(reference.SEPARATIONS)}


def float_bits(value: float) -> int:
    """The IEEE-754 double bit pattern of ``value`` as an int (the kernels' ``*_bits`` arguments):
    Triton types Python floats as fp32, which would round ``scale`` and ``eps`` on the fp64 path."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@functools.cache
def interpreting() -> bool:
    # Read once: Triton reads TRITON_INTERPRET when the kernels are decorated (at import).
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constexprs, num_warps=, num_stages=)``."""

    name: str
    kernel: object
    grid: tuple[int, ...]
    args: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    #: Launched with programmatic dependent launch (Hopper): may start while the previous launch
    #: runs; the kernel waits (gdc_wait) before it reads that launch's results.
    pdl: bool = False
    #: Registers per thread ptxas may use (``.maxnreg``); None: ptxas chooses, and its occupancy
    #: heuristic may cap a kernel below what it needs and spill.
    maxnreg: int | None = None

    def run(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        extra = dict(launch_pdl=True) if self.pdl else {}
        if self.maxnreg is not None:
            extra["maxnreg"] = self.maxnreg
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages,
                               **extra)


def run_all(launches: Sequence[Launch], device: torch.device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            for launch in launches:
                launch.run()
    else:  # the interpreter runs on CPU tensors
        for launch in launches:
            launch.run()


def interpreter_upcast(a: torch.Tensor, x_dtype: torch.dtype) -> bool:
    """Whether the fused GEMM runs its bf16 dots in fp32: only under the interpreter (whose bf16
    ``tl.dot`` is wrong), which runs on CPU tensors. Plans for a GPU or for compiling ahead of time
    (meta tensors) never take it, whatever the environment says."""
    return bool(interpreting() and a.device.type == "cpu" and x_dtype == torch.bfloat16)


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(base, adapter) ``input_precision`` of the dots for x of ``dtype``; see kernels.py."""
    if dtype == torch.float32:
        fp32 = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return fp32, fp32
    if dtype == torch.float64:
        return "ieee", "ieee"
    return "ieee", "tf32"  # the base precision is unused for 16-bit operands


def _score_precision(lora_precision: str) -> str:
    # Cosines on tensor cores at about fp32 accuracy where the adapter path may use TF32.
    return "tf32x3" if lora_precision == "tf32" else "ieee"


def _accurate(lora_precision: str) -> str:
    # The memory-bound adapter kernels (mixing, shrink, per-sample reductions) can afford 3xTF32
    # (about fp32 accuracy on tensor cores); for the expand inside the projection GEMM see
    # :func:`_expand_precision`.
    return "tf32x3" if lora_precision == "tf32" else lora_precision


def _wide_scores(ct: torch.dtype) -> bool:
    """Whether the backward computes the cosines, their affine sum and the weights in fp64 (each
    rounded once to ct): for every fp32 ct (16-bit and fp32 x), the ``grad_scores`` of the
    precision rules (contract section 11).

    dquery and dkeys scale the affine sum's error by about 1/sum^2 (dz = (dw - sum_m dw_m w_m) / d,
    w = s / d): where |sum_n s| is just above eps, fp32 cosines leave dquery 1.4-3.4x PyTorch's own
    (fp32) error, a coin toss against the 3x criterion, and tensor cores' 3xTF32 cosines (fp32
    accumulation rounded toward zero) 5-9x in the CPU model of the kernels; the second H200 run
    measured 5.5x (fp16 x, ViT-B qkv, B = 64, "negative" weights: 42 vs 7.7). In fp64: 0.02-0.14x.
    A (16, N) x d_k dot per program, on fp64 tensor cores on sm_80 / sm_90.
    """
    return ct == torch.float32


def _wide_forward_scores(x_dtype: torch.dtype) -> bool:
    """Whether the forward forms the cosines, their affine sum and the weights in fp64 (each rounded
    once to fp32), as the backward does (:func:`_wide_scores`): for fp32 x.

    Near the affine guard an error in the sum d moves every weight by d's relative error, times
    weights up to ~9: fp32 cosines summed in the kernel's order left the fp32 forward 5.5x PyTorch's
    own fp32 error on the H200 (ViT-B qkv, B = 64, "negative" weights: 0.10 vs 0.018; PyTorch's
    order is no better, only different: a coin toss against the 2x criterion). For 16-bit x the
    same shift is far under the output's ulp, so its forward keeps the cheaper tensor-core cosines.
    """
    return x_dtype == torch.float32


#: d_k step of the fp64 cosines at 32-slot chunks (products on FMA units, a (BLOCK_B, NC, step) fp64
#: tile per step; wider chunks take proportionally narrower steps): 16 spilled 56 bytes on sm_90
#: (fp32 x), 8 none on sm_80 / sm_90 with 16- or 32-bit queries (ahead-of-time sweep).
WIDE_BLOCK_K = 8
#: Registers of the retrieval with fp64 cosines (FMA units): with 192, no stack in 32 cases (forward and
#: backward, fp32 x with and without TF32, N = 30 and 256, r = 4 and 64, sm_80 and sm_90; Triton 3.8);
#: 160 left 8 bytes at N = 256 on sm_80, ptxas's own choice (72-178) 8-24 bytes in 9.
WIDE_MAXNREG = 192
#: Registers of the other retrievals: ptxas's own choice (168) left 8-16 bytes of stack in 12 of 32
#: 16-bit forward cases with the layers' 16-bit CLS query on sm_90 (B = 1-256, r = 4 and 16; Triton
#: 3.8), 255 in none. At most one ~64-program wave runs (configs.RETRIEVE_PROGRAMS): occupancy is moot.
RETRIEVE_MAXNREG = 255

#: Registers of the scores backward: ptxas's own choice (80 on sm_90, fp32 x with IEEE dots, B = 8, r = 128)
#: left 8 bytes of stack once it read the affine denominators (B,) from the retrieval; at most 229 used elsewhere.
SCORES_BWD_MAXNREG = 255

#: ``input_precision`` of the backward's dw = <dA_b, bank_a> + <dB_b, bank_b> (d_in S r + d_s S r long
#: sums, scaled like the cosines by about 1/sum^2 into dquery): "ieee", fp32 on FMA units (rounding
#: to nearest) for every dtype. Tensor cores' 3xTF32 accumulate in fp32 rounded toward zero, an error
#: that grows with the length instead of its square root. At B = 64 the column split keeps each
#: partial short (0.13x PyTorch's dquery error in the CPU model, fp64 cosines), but the split falls
#: to one share as B grows, and one long sum left 2.5-7x; fp32 FMA stays under 1x at any B.
_DW_PRECISION = "ieee"


def _expand_precision(x_dtype: torch.dtype, lora_precision: str) -> str:
    """``input_precision`` of the adapter's dots inside the fused GEMM (the expand, a folded shrink).

    fp16 x: 3xTF32. Its factors and h are fp32 (fp16 would overflow where the reference does not)
    and its output is fp16: one TF32 product truncates h and B_b to 10 bits, up to 2^-9 of the
    adapter's size, which is up to 4 ulp of an fp16 output the adapter dominates. The first GPU run
    (H200, ViT-B qkv, "negative" affine weights, B = 1) measured 1.05 against PyTorch's 0.25 (one
    rounding of |y| ~ 800), exactly what truncating h and B_b to TF32 gives on the CPU; fp32 factors
    with 3xTF32 products give PyTorch's 0.25. The cost, with h from the shrink launch (always, for
    fp32 factors): two TF32 dots of depth 16 per 8 columns of h and sample in an adapted tile (the
    kernel's SPLIT) instead of one per 16, beside the tile's K = d_in of fp16 products; Triton's own
    tf32x3 (three dots) spilled 16-88 bytes in these GEMMs on sm_90 (Triton 3.6), the split none.
    fp32 x with ``allow_tf32`` keeps
    one TF32 product (the user chose TF32 for the base GEMM too, as for torch.matmul); bf16 x: the
    shrink's bf16 operands take none, and its expand is a TF32 dot of rounded fp32 operands
    (:func:`_plan_gemm`); IEEE stays IEEE.
    """
    return _accurate(lora_precision) if x_dtype == torch.float16 else lora_precision


@dataclass
class _Shapes:
    B: int
    T: int
    M: int
    d_in: int
    N: int
    d_k: int
    S: int
    r: int
    d_s: int
    ct: torch.dtype

    @classmethod
    def of(cls, x, keys, bank_a, bank_b) -> _Shapes:
        B, T, d_in = x.shape
        N, d_k = keys.shape
        _, S, r, _ = bank_a.shape
        return cls(B, T, B * T, d_in, N, d_k, S, r, bank_b.shape[2], reference.compute_dtype(x.dtype))

    @property
    def fa(self) -> int:
        return self.S * self.r * self.d_in

    @property
    def fb(self) -> int:
        return self.S * self.d_s * self.r


# ----------------------------------------------------------------------------------------------
# Retrieval: scores + separation + mixing (launch 1 of the forward).
# ----------------------------------------------------------------------------------------------


@dataclass
class _Mixed:
    a: torch.Tensor  # (B, S, r, d_in) in the adapter's operand dtype
    b: torch.Tensor  # (B, S, d_s, r)
    scores: torch.Tensor | None = None  # (B, N) ct
    weights: torch.Tensor | None = None  # (B, N) ct
    qnorm: torch.Tensor | None = None  # (B,) ct
    knorm: torch.Tensor | None = None  # (N,) ct
    denom: torch.Tensor | None = None  # (B,) the affine guard's denominator, in the retrieval's sum dtype
    total: torch.Tensor | None = None  # (B,) the affine sum, in the retrieval's sum dtype (``save_total``)


def factor_dtype(x_dtype: torch.dtype, memory_dtypes: Sequence[torch.dtype] | None = None) -> torch.dtype:
    """Dtype the mixed factors are stored in (contract section 11): in the forward, the shrink's A_b
    (its B_b and h are always in the compute dtype, see below); in the backward, both.

    bf16 only for bf16 x: it has fp32's range, so no overflow the fp32 reference would not have, and
    the shrink's products with the bf16 x tile are then bf16 products, fp32 accumulated. The forward's
    expand keeps B_b and h in fp32, each rounded to nearest TF32 for a TF32 dot: with both in bf16
    the rounding of each (2^-9 of the adapter's size) added to the output's own, and the H200 measured
    2.07x PyTorch's error (ViT-B/16 qkv, B = 1, CLS query; the CPU emulation up to 2.9x over the
    test regimes at B = 64), where TF32 (2^-11 each) emulates at 1.0-1.6x (A_b stays bf16: in fp32
    too it brings the emulation to 1.0x, but the folded shrink spills with fp32 operands).

    Backward plans pass ``memory_dtypes`` (query, keys, banks): a gradient of an fp32 tensor is owed
    fp32 accuracy (a bf16 factor would cost it 2^-8 relative), so the backward keeps bf16 factors
    only when every memory tensor is bf16. fp16 x stores fp32: fp16 factors or h overflow at 65504
    where the fp32 reference stays finite (a created inf); the adapter's products are then 3xTF32
    (:func:`_expand_precision`), about fp32 accuracy.
    """
    if x_dtype == torch.bfloat16 and all(d == torch.bfloat16 for d in memory_dtypes or ()):
        return x_dtype
    return reference.compute_dtype(x_dtype)


_planning_capability: list[tuple[int, int] | None] = [None]


@contextlib.contextmanager
def planning_for(capability: tuple[int, int]):
    """Plans made inside (on meta tensors) are those a device of ``capability`` would run."""
    _planning_capability.append(tuple(capability))
    try:
        yield
    finally:
        _planning_capability.pop()


def target_capability(device: torch.device) -> tuple[int, int]:
    """The GPU generation plans are made for: the device's own; for meta tensors the one set by
    :func:`planning_for` (Hopper by default: the performance model's target); CPU tensors (the
    interpreter) plan as Hopper too, without its launch features."""
    if device.type == "cuda":
        from . import _capability

        return _capability(device.index if device.index is not None else torch.cuda.current_device())
    return _planning_capability[-1] or (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, compiled kernels only."""
    if interpreting() or device.type == "cpu":
        return False
    return target_capability(device) >= (9, 0)


def _plan_retrieve(sh: _Shapes, query, keys, bank_a, bank_b, separation, eps, save_stats, precision, fdt,
                   device, launches, pdl, wide_scores=False, save_total=False, branch=None,
                   totals_only=False, fdt_b=None) -> _Mixed:
    """The retrieval launch (see ``_mira_retrieve_kernel``): the mixed A_b in ``fdt``, B_b in
    ``fdt_b`` (default ``fdt``; the forward's is the compute dtype, see :func:`factor_dtype`).
    ``save_total``: store the affine sum (B,) in ``mixed.total`` (fp64 with ``wide_scores``, else
    ct); ``branch``: the forward's sum, from which the affine guard takes its branch; ``totals_only``:
    no mixing (no factors), only the sums (with ``save_total``): the forward's retrieval replayed by
    the backward for its sum."""
    ct = sh.ct
    st = torch.float64 if wide_scores else ct
    stats = torch.empty(0, dtype=ct, device=device)
    if totals_only:
        mixed = _Mixed(a=stats, b=stats)
    else:
        mixed = _Mixed(a=torch.empty(sh.B, sh.S, sh.r, sh.d_in, dtype=fdt, device=device),
                       b=torch.empty(sh.B, sh.S, sh.d_s, sh.r, dtype=fdt_b or fdt, device=device))
    if save_stats:
        mixed.scores = torch.empty(sh.B, sh.N, dtype=ct, device=device)
        mixed.weights = torch.empty(sh.B, sh.N, dtype=ct, device=device)
        mixed.qnorm = torch.empty(sh.B, dtype=ct, device=device)
        mixed.knorm = torch.empty(sh.N, dtype=ct, device=device)
        mixed.denom = torch.empty(sh.B, dtype=st, device=device)
    if save_total:
        mixed.total = torch.empty(sh.B, dtype=st, device=device)
    fa, fb = (0, 0) if totals_only else (sh.fa, sh.fb)
    cfg = configs.retrieve_config(sh.N, ct, precision, sh.B)
    b_tiles = triton_cdiv(sh.B, cfg.block_b)
    split = 1 if totals_only else configs.retrieve_split(b_tiles, triton_cdiv(max(fa, fb), cfg.block_f))
    one_chunk = sh.N <= cfg.slot_chunk
    # fp64 cosines on FMA units hold a (BLOCK_B, NC, block_k) product tile: at 16-sample tiles WIDE_BLOCK_K
    # steps at 32-slot chunks, narrower ones at wider chunks (64 slots at 8 wide left 16 bytes of stack on
    # sm_80); smaller sample tiles take wider steps for the same tile size. The deferred sums ("fma") also
    # keep a (NC, block_k) fp64 tile of the keys' squares across the loop: at most 2048 elements (N = 256
    # with 64-wide steps left 232 bytes of stack on sm_90, 32-wide none).
    wide_k = WIDE_BLOCK_K * 32 * 16 // (cfg.slot_chunk * cfg.block_b)
    if cfg.score_precision == "fma":
        wide_k = min(wide_k, 2048 // cfg.slot_chunk)
    block_k = max(1, min(cfg.block_k, wide_k)) if wide_scores else cfg.block_k
    scratch = stats if one_chunk else torch.empty(b_tiles * split, cfg.block_b, sh.N, dtype=ct, device=device)
    launches.append(Launch(
        "retrieve_total" if totals_only else "retrieve", kernels._mira_retrieve_kernel, (b_tiles, split),
        dict(q_ptr=query, k_ptr=keys, bank_a_ptr=bank_a, bank_b_ptr=bank_b, mixed_a_ptr=mixed.a, mixed_b_ptr=mixed.b,
             scores_ptr=mixed.scores if save_stats else stats, weights_ptr=mixed.weights if save_stats else stats,
             qnorm_ptr=mixed.qnorm if save_stats else stats, knorm_ptr=mixed.knorm if save_stats else stats,
             scratch_ptr=scratch, total_ptr=mixed.total if save_total else stats,
             branch_ptr=branch if branch is not None else stats, denom_ptr=mixed.denom if save_stats else stats,
             B=sh.B, N=sh.N, DK=sh.d_k, FA=fa, FB=fb, eps_bits=float_bits(eps),
             stride_qb=query.stride(0), stride_qk=query.stride(1), stride_kn=keys.stride(0),
             stride_kk=keys.stride(1)),
        dict(SEPARATION=SEPARATION_CODES[separation], SAVE_STATS=bool(save_stats), NC=cfg.slot_chunk,
             ONE_CHUNK=one_chunk, BLOCK_B=cfg.block_b, BLOCK_K=block_k, BLOCK_F=cfg.block_f,
             SCORE_PRECISION=cfg.score_precision or _accurate(precision),
             MIX_PRECISION=cfg.mix_precision or _accurate(precision),
             USE_PDL=bool(pdl),
             WIDE_SCORES=bool(wide_scores), SAVE_TOTAL=bool(save_total), FWD_BRANCH=branch is not None,
             MIX=not totals_only),
        # The replay of the forward's sums in one stage: with two, storing them left 32-88 bytes of stack at
        # B = 256 (16-bit x, sm_80 / sm_90). Pipelining moves the loads, not the order of the sums.
        num_warps=cfg.num_warps, num_stages=1 if totals_only else 2,
        maxnreg=WIDE_MAXNREG if wide_scores else RETRIEVE_MAXNREG,
    ))
    return mixed


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# The fused projection GEMM (launch 2), the separate shrink for large adapters.
# ----------------------------------------------------------------------------------------------


def _plan_shrink(name, inp, in_offsets, k, f, f_strides, j, sh: _Shapes, lora_precision, launches,
                 pdl: bool = False) -> torch.Tensor:
    """out (M, len(in_offsets) * j) fp32 = per-row in[:, off_s : off_s + k] @ F[b, s]^T (see the kernel);
    ``pdl``: launched while its predecessor (the retrieval) runs, waiting for its results."""
    num_slices = len(in_offsets)
    out = torch.empty(sh.M, num_slices * j, dtype=sh.ct, device=inp.device)
    native = inp.dtype == f.dtype == torch.bfloat16 and not interpreting()
    # Beside the GEMM (pdl): many short programs, its latency is the wait the GEMM may see.
    cfg = (configs.beside_config(configs.padded(j), sh.ct, lora_precision, native) if pdl
           else configs.row_config(configs.padded(j), sh.ct, lora_precision))
    launches.append(Launch(
        name, kernels._mira_shrink_fwd_kernel, (triton_cdiv(sh.M, cfg.block_m), num_slices),
        dict(in_ptr=inp, f_ptr=f, out_ptr=out, M=sh.M, T=sh.T, K=k, J=j, stride_im=inp.stride(0),
             stride_fb=f_strides[0], stride_fs=f_strides[1], stride_fj=f_strides[2], stride_fk=f_strides[3]),
        dict(NUM_SLICES=num_slices, IN_OFFS=tuple(in_offsets), J_PAD=configs.padded(j),
             BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, LORA_PRECISION=_accurate(lora_precision),
             USE_PDL=bool(pdl), NATIVE=native),
        num_warps=cfg.num_warps, num_stages=2, pdl=bool(pdl),
    ))
    return out


@dataclass
class _Factor:
    """A per-sample factor as the fused GEMM reads it: F[b, s, rr, i] through four strides; ``sliced``:
    position i covers only the S slices (at the layer's offsets, ``width`` wide) of its axis."""

    tensor: torch.Tensor
    strides: tuple[int, int, int, int]  # (sample, slice, rank, position)
    sliced: bool
    width: int


def _mixed_a_factor(mixed: _Mixed, sh: _Shapes) -> _Factor:
    st = mixed.a.stride()  # (B, S, r, d_in)
    return _Factor(mixed.a, (st[0], st[1], st[2], st[3]), False, sh.d_in)


def _mixed_b_factor(mixed: _Mixed, sh: _Shapes) -> _Factor:
    st = mixed.b.stride()  # (B, S, d_s, r): position = output column in the slice
    return _Factor(mixed.b, (st[0], st[1], st[3], st[2]), True, sh.d_s)


@functools.cache
def _column_order(n_tiles: int, block_n: int, offsets: tuple, width: int, e_sliced: bool, adapted_only: bool):
    """Column tiles in the order a program visits them: tiles no slice touches first (computed
    before the program waits for the retrieval), then adapted ones; adapted_only drops the first."""
    def adapted(n):
        return not e_sliced or any(n * block_n < off + width and n * block_n + block_n > off for off in offsets)

    plain = [n for n in range(n_tiles) if not adapted(n)]
    lora = [n for n in range(n_tiles) if adapted(n)]
    return tuple(lora if adapted_only else plain + lora)


def tma_descriptors(a: torch.Tensor, w: torch.Tensor | None, w_strides: tuple[int, int], out: torch.Tensor,
                    block_m: int, block_n: int, block_k: int):
    """(x_desc, w_desc, out_desc) for the GEMM's TMA main loop and store (``_mira_gemm_kernel``'s TMA),
    or None where the operands do not allow it: a 16-bit x (M, K) with unit column stride, W
    (``w_strides``: its k and n strides) the weight as (NOUT, K), row-major (the forward's; the
    backward's dx GEMM reads the weight the other way round), out (M, NOUT), all of one dtype, their
    bases and row strides 16-byte aligned (what a TMA descriptor needs), and a Triton with host tensor
    descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if w is None or a.dtype not in (torch.float16, torch.bfloat16) or {w.dtype, out.dtype} != {a.dtype}:
        return None
    if out.dim() != 2 or out.shape[0] != a.shape[0] or tuple(w.shape) != (out.shape[1], a.shape[1]):
        return None
    if w_strides != (1, w.stride(0)):  # W[k, n] = weight[n, k]; the unit stride is checked below
        return None
    size = a.element_size()
    for t in (a, w, out):
        if t.stride(1) != 1 or (t.stride(0) * size) % 16 or (t.device.type != "meta" and t.data_ptr() % 16):
            return None
    return (TensorDescriptor.from_tensor(a, [block_m, block_k]), TensorDescriptor.from_tensor(w, [block_n, block_k]),
            TensorDescriptor.from_tensor(out, [block_m, block_n]))


def _plan_gemm(name, a, w, w_strides, bias, out, sh: _Shapes, offsets, scale, x_dtype, launches, *,
               f: _Factor | None = None, e: _Factor | None = None, h: torch.Tensor | None = None,
               store_h: torch.Tensor | None = None, in_place: bool = False, pdl: bool = False) -> None:
    """out (M, n_out) = a (M, k) @ W + bias + scale * (a F_b^T) E_b, fused (see ``_mira_gemm_kernel``).

    ``f``/``e``: the shrink and expand factors (None: no adapter). ``h``: the shrink computed by a
    separate launch (large adapters), else it is folded into the main loop. ``store_h``: keep
    scale * a F_b^T there (M, S*r) fp32. ``in_place``: no base product, out is read and updated.
    """
    m = a.shape[0]
    k = a.shape[1]
    n_out = out.shape[1]
    base_precision, lora_precision = _precisions(x_dtype)
    lora_precision = _expand_precision(x_dtype, lora_precision)
    # With h from the shrink launch (LORA = 2) a 3xTF32 expand runs as the kernel's SPLIT: the same
    # three products in two TF32 dots (h's hi and lo halves share one dot's columns), not three.
    split = lora_precision == "tf32x3" and h is not None
    if split:
        lora_precision = "tf32"
    half = (torch.float16, torch.bfloat16)
    # bf16 x expands with fp32 B_b and h, each rounded to nearest TF32 in the kernel (contract section 11);
    # 16-bit operands take no input precision ("ieee" names none).
    expand_tf32 = x_dtype == torch.bfloat16 and e is not None and e.tensor.dtype == torch.float32
    expand_precision = "tf32" if expand_tf32 else ("ieee" if e is not None and e.tensor.dtype in half
                                                    else lora_precision)
    if f is not None and f.tensor.dtype in half:
        lora_precision = "ieee"
    j = sh.S * sh.r
    lora = 0 if e is None else (2 if h is not None else 1)
    cfg = configs.fused_config(m, n_out, k, x_dtype, base_precision, sh.T, j if lora == 1 else 0,
                               target_capability(a.device))

    def schedule(cfg):
        m_tiles, n_tiles = triton_cdiv(m, cfg.block_m), triton_cdiv(n_out, cfg.block_n)
        order = list(_column_order(n_tiles, cfg.block_n, tuple(offsets), e.width if e else 0, bool(e and e.sliced),
                                   in_place))
        adapted = set(_column_order(n_tiles, cfg.block_n, tuple(offsets), e.width if e else 0,
                                    bool(e and e.sliced), True)) if e is not None else set()
        plain = sum(1 for n in order if n not in adapted)
        groups = configs.column_groups(m_tiles, len(order), cfg.block_n, cfg.j_pad if lora == 1 else 0, plain,
                                       cfg.num_warps)
        tiles = triton_cdiv(len(order), groups)
        # Groups whose first tile (order[g]) has no adapter, launched first for every row block; none
        # when every group starts on such a tile (row-block order is then the same thing).
        lead = plain if adapted and plain < groups else 0
        return m_tiles, groups, lead, tiles, tuple(order + [-1] * (tiles * groups - len(order)))

    m_tiles, groups, lead_groups, tiles, order = schedule(cfg)
    if not configs.one_tile_fits(cfg, tiles=tiles, in_place=in_place, lora=lora):
        cfg = configs.narrow_tile(cfg, sh.T, j if lora == 1 else 0)
        m_tiles, groups, lead_groups, tiles, order = schedule(cfg)
    # The TMA main loop and store only where a measurement asks for it, for the weight as (NOUT, K).
    descs = (tma_descriptors(a, w, tuple(w_strides), out, cfg.block_m, cfg.block_n, cfg.block_k)
             if configs.forced_tma() and not in_place else None)
    placeholder = out
    fac_f = f if f is not None else _Factor(placeholder, (0, 0, 0, 0), False, 0)
    fac_e = e if e is not None else _Factor(placeholder, (0, 0, 0, 0), False, 0)
    # A persistent launch (a measurement's opt-in) walks the work items with fewer programs; each item
    # is computed whole by one program either way, so the bits do not depend on the count.
    items = m_tiles * groups
    persistent = configs.persistent_programs()
    programs = items if persistent is None else min(items, persistent)
    launches.append(Launch(
        name, kernels._mira_gemm_kernel, (programs,),
        dict(x_ptr=a, w_ptr=w if w is not None else a, bias_ptr=bias if bias is not None else out,
             f_ptr=fac_f.tensor, e_ptr=fac_e.tensor, out_ptr=out,
             h_ptr=h if h is not None else (store_h if store_h is not None else placeholder),
             # Without TMA the descriptors' places hold the operands' pointers, never read (a pointer
             # argument works on every Triton, where a None one is a specialisation some may lack).
             x_desc=descs[0] if descs else a, w_desc=descs[1] if descs else (w if w is not None else a),
             out_desc=descs[2] if descs else out,
             M=m, NOUT=n_out, K=k, T=sh.T, J=j, R=sh.r, NB=sh.B, F_WIDTH=fac_f.width, E_WIDTH=fac_e.width,
             scale_bits=float_bits(scale), ITEMS=items, PROGRAMS=programs, stride_xm=a.stride(0),
             stride_wk=w_strides[0], stride_wn=w_strides[1],
             stride_bias=bias.stride(0) if bias is not None else 0, stride_om=out.stride(0),
             stride_fb=fac_f.strides[0], stride_fs=fac_f.strides[1], stride_fr=fac_f.strides[2],
             stride_fk=fac_f.strides[3], stride_eb=fac_e.strides[0], stride_es=fac_e.strides[1],
             stride_er=fac_e.strides[2], stride_en=fac_e.strides[3]),
        dict(S=sh.S, OFFS=tuple(offsets), F_SLICED=fac_f.sliced, E_SLICED=fac_e.sliced, HAS_BASE=w is not None,
             HAS_BIAS=bias is not None, LORA=lora, IN_PLACE=bool(in_place), STORE_H=store_h is not None,
             SPB=cfg.samples_per_block, J_PAD=cfg.j_pad, J_CHUNK=configs.MIN_DOT,
             J_STEP=configs.MIN_DOT // 2 if split else configs.MIN_DOT, SPLIT=split,
             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUPS=groups,
             LEAD_GROUPS=lead_groups, ORDER=order,
             TILES=tiles, BASE_PRECISION=base_precision, LORA_PRECISION=lora_precision,
             EXPAND_PRECISION=expand_precision, EXPAND_TF32=expand_tf32,
             UPCAST=interpreter_upcast(a, x_dtype),
             W_ORDER=(0, 1) if w_strides[0] == 1 and w_strides[1] != 1 else (1, 0), USE_PDL=bool(pdl and lora > 0),
             TMA=descs is not None, PERSISTENT=programs < items,
             # The second pass where scale * h overflows a finite h (kernels._gemm_work_item), for the
             # forward and mira_adapter_; the backward's dx overflows as the reference's scale * (G B) does.
             OVERFLOW_PASS=name != "gemm_dx"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, pdl=bool(pdl and lora > 0),
        maxnreg=configs.gemm_maxnreg(cfg.num_warps),
    ))


# ----------------------------------------------------------------------------------------------
# Public plans.
# ----------------------------------------------------------------------------------------------


def _memory_inputs(query, keys, bank_a, bank_b):
    # Banks are read as flat (N, F) rows; parameters are contiguous already, so this is free.
    return query, keys, bank_a.contiguous(), bank_b.contiguous()


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """(B, T, d) as (M, d) rows with unit column stride: a view when the strides allow, else a copy."""
    if t.stride(-1) == 1:
        try:
            return t.view(m, t.shape[-1])
        except RuntimeError:
            pass
    return t.contiguous().view(m, t.shape[-1])


def _fused_shrink(sh: _Shapes, n_out: int, k: int, x_dtype: torch.dtype, fdt: torch.dtype, device: torch.device,
                  backward: bool = False) -> bool:
    """Whether the shrink folds into the GEMM's main loop (two launches) or gets its own launch.

    Folded while the row block's stacked adapter columns (samples per block x S*r) fit one small
    dot, for 16-bit factors only (``fdt``: bf16 x, see :func:`factor_dtype`): the ahead-of-time sweep
    found the folded shrink spilling (136-392 bytes) with fp32 operands (the fp32/TF32 GEMM) on sm_80
    and sm_90 and in the 16-bit dx GEMM on sm_80, and spill-free in the 16-bit forward on both and the
    16-bit dx GEMM on sm_90. fp32 factors (fp16, fp32, fp64 x) and the sm_80 backward keep the
    separate shrink launch (at small batch chained beside the GEMM: :data:`.configs.SHRINK_BESIDE_ROWS`,
    which also says why bf16 keeps the folded shrink there).
    """
    if fdt not in (torch.float16, torch.bfloat16) or configs.forced_unfolded():
        return False
    capability = target_capability(device)
    if backward and capability < (9, 0):
        return False
    cfg = configs.fused_config(sh.M, n_out, k, x_dtype, _precisions(x_dtype)[0], sh.T, sh.S * sh.r, capability)
    return cfg.samples_per_block * sh.S * sh.r <= configs.MAX_FUSED_J


def _plan_factors(sh: _Shapes, x2, query, keys, bank_a, bank_b, separation, eps, fused, launches):
    """The forward's launches before the GEMM: the retrieval (mixed factors), then, unless the GEMM
    folds the shrink in (``fused``), the shrink's own launch. Returns (mixed, h or None, pdl)."""
    query, keys, bank_a, bank_b = _memory_inputs(query, keys, bank_a, bank_b)
    precision = _precisions(x2.dtype)[1]
    # On Hopper each launch starts while its predecessor runs (programmatic dependent launch): the GEMM
    # waits for the mixed factors before its main loop when the shrink is folded in; with h from the
    # shrink launch (which waits for the retrieval) it waits only before its expand, at small batch
    # (configs.SHRINK_BESIDE_ROWS), whose small GEMM programs can share an SM with the waiting ones.
    # Larger unfolded plans run their launches in turn: a big GEMM program cannot sit beside them.
    pdl = use_pdl(x2.device) and (fused or sh.M <= configs.SHRINK_BESIDE_ROWS)
    mixed = _plan_retrieve(sh, query, keys, bank_a, bank_b, separation, eps, False, precision,
                           factor_dtype(x2.dtype), x2.device, launches, pdl,
                           wide_scores=_wide_forward_scores(x2.dtype), fdt_b=sh.ct)
    h = None
    if not fused:
        st = mixed.a.stride()
        h = _plan_shrink("shrink", x2, (0,), sh.d_in, mixed.a, (st[0], 0, st[2], st[3]), sh.S * sh.r, sh, precision,
                         launches, pdl=pdl)
    return mixed, h, pdl


#: Columns per program of the per-feature key normalisation: 768 features in 12 programs.
NORMALIZE_BLOCK_D = 64


def plan_normalize_columns(keys: torch.Tensor, eps: float) -> tuple[torch.Tensor, Launch]:
    """The per-feature normalisation of keys (N, D) in one launch: (the contiguous output, its launch).

    The output is in the keys' dtype, except for bfloat16 keys under the interpreter (CPU tensors):
    there it is float32 and the caller rounds it, as the interpreter rounds a bfloat16 store wrongly
    (0.5 off) where its float32 and float16 stores are exact. Compiled, the kernel stores bfloat16
    itself (checked by the lowering and by the `gpu` tests)."""
    if keys.dim() != 2 or keys.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"normalize_columns takes floating keys (N, D), got {keys.dtype} of shape "
                         f"{tuple(keys.shape)}")
    N, D = keys.shape
    interpreter_bf16 = keys.dtype == torch.bfloat16 and interpreting() and keys.device.type == "cpu"
    out = torch.empty((N, D), dtype=torch.float32 if interpreter_bf16 else keys.dtype, device=keys.device)
    block_n = min(32, 1 << max(N - 1, 0).bit_length())
    launch = Launch("normalize_columns", kernels._normalize_columns_kernel, (triton_cdiv(D, NORMALIZE_BLOCK_D),),
                    dict(k_ptr=keys, out_ptr=out, N=N, D=D, stride_kn=keys.stride(0), stride_kd=keys.stride(1),
                         eps_bits=float_bits(eps)),
                    dict(BLOCK_N=block_n, BLOCK_D=NORMALIZE_BLOCK_D), num_warps=2, num_stages=1)
    return out, launch


def plan_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """Plan of the forward: returns (y (B, T, d_out) in x's dtype, launches).

    Two launches: the retrieval and the fused GEMM (which waits for it, on Hopper, only where it
    first reads the mixed factors); a third, the shrink, only for wide adapters. No slots: the GEMM.
    """
    sh = _Shapes.of(x, keys, bank_a, bank_b)
    d_out = weight.shape[0]
    launches: list[Launch] = []
    y = torch.empty(sh.B, sh.T, d_out, dtype=x.dtype, device=x.device)
    if sh.M == 0:
        return y, launches
    x2 = _rows(x, sh.M)
    w_strides = (weight.stride(1), weight.stride(0))  # W[k, n] = weight[n, k]
    if sh.N == 0:  # no slots: the adapter is zero, only the base projection runs
        _plan_gemm("gemm", x2, weight, w_strides, bias, y.view(sh.M, d_out), sh, slice_offsets, scale, x.dtype,
                   launches)
        return y, launches
    fused = _fused_shrink(sh, d_out, sh.d_in, x.dtype, factor_dtype(x.dtype), x.device)
    mixed, h, pdl = _plan_factors(sh, x2, query, keys, bank_a, bank_b, separation, eps, fused, launches)
    _plan_gemm("gemm", x2, weight, w_strides, bias, y.view(sh.M, d_out), sh, slice_offsets, scale, x.dtype,
               launches, f=_mixed_a_factor(mixed, sh), e=_mixed_b_factor(mixed, sh), h=h, pdl=pdl)
    return y, launches


def _flattenable(out: torch.Tensor) -> bool:
    return out.stride(2) == 1 and (out.shape[0] <= 1 or out.stride(0) == out.shape[1] * out.stride(1))


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    # [first, last + 1) bytes a tensor's elements can occupy (non-negative strides, numel > 0).
    size = t.element_size()
    return t.data_ptr(), t.data_ptr() + size * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of a and b can meet (meta tensors have no addresses: never)."""
    if a.device.type == "meta" or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def plan_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """Plan of the in-place adapter add. Returns (target, launches): ``target`` is ``out`` or a
    contiguous copy that the caller copies back (for outputs whose rows cannot be flattened).

    The fused GEMM without its base product: for each adapted column tile it reads out, adds the
    expand, writes it back; the first tile of a program computes h in its (shrink-only) main loop.
    When ``out`` is ``x`` (the one alias the contract allows), programs that share a row block
    would overwrite x before another program's shrink read it: the shrink then runs as its own
    launch first, so every read of x precedes every write of out.
    """
    sh = _Shapes.of(x, keys, bank_a, bank_b)
    launches: list[Launch] = []
    if sh.M == 0 or sh.N == 0:
        return out, launches
    target = out if _flattenable(out) else out.contiguous()
    x2 = _rows(x, sh.M)
    fused = (_fused_shrink(sh, target.shape[2], sh.d_in, x.dtype, factor_dtype(x.dtype), x.device)
             and not _overlaps(target, x))
    mixed, h, pdl = _plan_factors(sh, x2, query, keys, bank_a, bank_b, separation, eps, fused, launches)
    rows = target.as_strided((sh.M, target.shape[2]), (target.stride(1), 1)) if sh.M else target
    _plan_gemm("gemm", x2, None, (0, 0), None, rows, sh, slice_offsets, scale, x.dtype, launches,
               f=_mixed_a_factor(mixed, sh), e=_mixed_b_factor(mixed, sh), h=h, in_place=True, pdl=pdl)
    return target, launches


def plan_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps,
                         output_mask):
    """Plan of the backward: returns ((dx, dquery, dkeys, dbank_a, dbank_b), launches).

    Recomputes weights and mixed factors from the inputs (the forward saves only its inputs), the
    affine guard's branch as the forward took it (a replay of the forward's sums for 16-bit x). dx
    is the fused GEMM with the roles swapped (x = G, the shrink factor B_b over the slices of
    d_out, the expand factor A_b), which also keeps dh = scale G_s B_b for dA; h = x A_b^T for dB
    is one shrink launch. Gradients not asked for are None.
    """
    sh = _Shapes.of(x, keys, bank_a, bank_b)
    need_x, need_q, need_k, need_a, need_b = (bool(m) for m in output_mask)
    device = x.device
    launches: list[Launch] = []
    dev = dict(device=device)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dq = torch.zeros(query.shape, dtype=query.dtype, **dev) if need_q else None
    dk = torch.zeros(keys.shape, dtype=keys.dtype, **dev) if need_k else None
    da = torch.zeros(bank_a.shape, dtype=bank_a.dtype, **dev) if need_a else None
    db = torch.zeros(bank_b.shape, dtype=bank_b.dtype, **dev) if need_b else None
    grads = (dx, dq, dk, da, db)
    if sh.M == 0:  # no tokens: every gradient is zero
        if dx is not None:
            dx.zero_()
        return grads, launches

    g2 = _rows(grad_out, sh.M)
    x2 = _rows(x, sh.M)
    query, keys, bank_a, bank_b = _memory_inputs(query, keys, bank_a, bank_b)
    precision = lora_precision = _precisions(x.dtype)[1]
    has_lora = sh.N > 0
    need_dw = has_lora and (need_q or need_k)
    need_da = has_lora and (need_a or need_dw)
    need_db = has_lora and (need_b or need_dw)
    need_dh = has_lora and (need_x or need_da)
    w_strides = (weight.stride(0), weight.stride(1))  # W[k, n] = weight[k, n]: dx = G weight

    mixed = None
    fdt = factor_dtype(x.dtype, (query.dtype, keys.dtype, bank_a.dtype, bank_b.dtype))
    fwd_total = None
    if has_lora:
        # The affine guard's branch (and the clamp's sign) is the forward's, whose sum no tensor carries
        # (the forward saves only its inputs): where the backward forms the sum as the forward does (fp32
        # and fp64 x: the same kernel, sums and config) its retrieval keeps its own for the scores backward;
        # 16-bit x's forward sums fp32 cosines, the backward fp64 ones, so the forward's retrieval is
        # replayed first (the sums only) and the backward's takes the branch from it.
        wide = _wide_scores(sh.ct)
        affine = separation == "affine"
        replay = affine and sh.N > 1 and wide != _wide_forward_scores(x.dtype)  # N = 1: raw cosines, no sum
        if replay:
            fwd_total = _plan_retrieve(sh, query, keys, bank_a, bank_b, separation, eps, False, precision, fdt, device,
                                       launches, False, wide_scores=_wide_forward_scores(x.dtype), save_total=True,
                                       totals_only=True).total
        own_total = affine and need_dw and not replay
        mixed = _plan_retrieve(sh, query, keys, bank_a, bank_b, separation, eps, need_dw or need_a or need_b,
                               precision, fdt, device, launches, False, wide_scores=wide, save_total=own_total,
                               branch=fwd_total)
        if own_total:
            fwd_total = mixed.total
    h = dh = None
    if need_db:
        st = mixed.a.stride()
        h = _plan_shrink("shrink_h", x2, (0,), sh.d_in, mixed.a, (st[0], 0, st[2], st[3]), sh.S * sh.r, sh,
                         precision, launches)
    dh_scaled = False
    if need_x:
        if has_lora:
            fused = _fused_shrink(sh, sh.d_in, weight.shape[0], x.dtype, fdt, x.device, backward=True)
            if not fused:  # wide adapters: dh (unscaled) from its own launch, read by the GEMM
                st = mixed.b.stride()
                dh = _plan_shrink("shrink_dh", g2, tuple(slice_offsets), sh.d_s, mixed.b, (st[0], st[1], st[3], st[2]),
                                  sh.r, sh, precision, launches)
            else:
                dh = torch.empty(sh.M, sh.S * sh.r, dtype=sh.ct, **dev)
                dh_scaled = True
            _plan_gemm("gemm_dx", g2, weight, w_strides, None, dx.view(sh.M, sh.d_in), sh, slice_offsets, scale,
                       x.dtype, launches, f=_mixed_b_factor(mixed, sh), e=_mixed_a_factor(mixed, sh),
                       h=None if fused else dh, store_h=dh if fused else None)
        else:
            _plan_gemm("gemm_dx", g2, weight, w_strides, None, dx.view(sh.M, sh.d_in), sh, slice_offsets, scale,
                       x.dtype, launches)
    elif need_dh:
        st = mixed.b.stride()
        dh = _plan_shrink("shrink_dh", g2, tuple(slice_offsets), sh.d_s, mixed.b, (st[0], st[1], st[3], st[2]), sh.r,
                          sh, precision, launches)

    dmixed_a = dmixed_b = None
    if need_db:
        row_cfg = configs.factor_config(configs.padded(sh.r), sh.ct, lora_precision)
        dmixed_b = torch.empty(sh.B, sh.S, sh.d_s, sh.r, dtype=sh.ct, **dev)
        so = dmixed_b.stride()
        launches.append(Launch(
            "factor_bwd_b", kernels._mira_factor_bwd_kernel,
            (sh.B, sh.S, triton_cdiv(sh.d_s, row_cfg.block_m)),
            dict(l_ptr=g2, r_ptr=h, out_ptr=dmixed_b, T=sh.T, FD=sh.d_s, J=sh.r, alpha_bits=float_bits(scale),
                 stride_lm=g2.stride(0), stride_rm=h.stride(0), stride_ob=so[0], stride_os=so[1], stride_of=so[2],
                 stride_oj=so[3]),
            dict(NUM_SLICES=sh.S, L_OFFS=tuple(slice_offsets), J_PAD=configs.padded(sh.r),
                 BLOCK_T=row_cfg.block_k, BLOCK_F=row_cfg.block_m, LORA_PRECISION=_accurate(lora_precision)),
            num_warps=row_cfg.num_warps, num_stages=2,
        ))
    if need_da:
        row_cfg = configs.factor_config(configs.padded(sh.S * sh.r), sh.ct, lora_precision)
        dmixed_a = torch.empty(sh.B, sh.S, sh.r, sh.d_in, dtype=sh.ct, **dev)
        # One slice of S*r columns: out[b, 0, f, j'] = dA[b, s, r, f] with j' = s*r + r.
        launches.append(Launch(
            "factor_bwd_a", kernels._mira_factor_bwd_kernel,
            (sh.B, 1, triton_cdiv(sh.d_in, row_cfg.block_m)),
            dict(l_ptr=x2, r_ptr=dh, out_ptr=dmixed_a, T=sh.T, FD=sh.d_in, J=sh.S * sh.r,
                 alpha_bits=float_bits(1.0 if dh_scaled else scale),
                 stride_lm=x2.stride(0), stride_rm=dh.stride(0), stride_ob=dmixed_a.stride(0), stride_os=0,
                 stride_of=1, stride_oj=sh.d_in),
            dict(NUM_SLICES=1, L_OFFS=(0,), J_PAD=configs.padded(sh.S * sh.r),
                 BLOCK_T=row_cfg.block_k, BLOCK_F=row_cfg.block_m, LORA_PRECISION=_accurate(lora_precision)),
            num_warps=row_cfg.num_warps, num_stages=2,
        ))

    mem = configs.memory_config(sh.N, sh.ct, lora_precision)
    if need_dw:
        # Two passes: partial dw per column share of the banks, then their ordered sum. The first
        # on FMA units (see _DW_PRECISION), with the IEEE tiles.
        mem_dw = configs.memory_config(sh.N, sh.ct, _DW_PRECISION)
        b_tiles = triton_cdiv(sh.B, mem.block_b)
        split = configs.split_for(b_tiles, triton_cdiv(max(sh.fa, sh.fb), mem_dw.block_f))
        partial = torch.empty(split, sh.B, sh.N, dtype=sh.ct, **dev)
        launches.append(Launch(
            "dw_bwd", kernels._mira_dw_bwd_kernel, (b_tiles, split, triton_cdiv(sh.N, mem_dw.slot_chunk)),
            dict(dmixed_a_ptr=dmixed_a, dmixed_b_ptr=dmixed_b, bank_a_ptr=bank_a, bank_b_ptr=bank_b,
                 partial_ptr=partial, B=sh.B, N=sh.N, FA=sh.fa, FB=sh.fb),
            dict(NC=mem_dw.slot_chunk, BLOCK_B=mem_dw.block_b, BLOCK_F=mem_dw.block_f, LORA_PRECISION=_DW_PRECISION),
            num_warps=mem_dw.num_warps, num_stages=2,
        ))
        dz = torch.empty(sh.B, sh.N, dtype=sh.ct, **dev)
        score_precision = _score_precision(lora_precision)
        # 4 warps and 16-wide d_k chunks: the only pair of (8, 4) warps x (16, 32) columns with no stack
        # on sm_80 and sm_90 across 16- and 32-bit x at B = 1-256 (8 warps with 32 held 64 registers and
        # spilled with the layers' 16-bit CLS query; ahead-of-time, Triton 3.8).
        dq_block_k = min(mem.grad_k, 16)
        k_chunks = triton_cdiv(sh.d_k, dq_block_k) if need_q else 1
        launches.append(Launch(
            "scores_bwd", kernels._mira_scores_bwd_kernel, (b_tiles, k_chunks),
            dict(partial_ptr=partial, scores_ptr=mixed.scores, weights_ptr=mixed.weights, qnorm_ptr=mixed.qnorm,
                 knorm_ptr=mixed.knorm, denom_ptr=mixed.denom, branch_ptr=fwd_total if fwd_total is not None else dz,
                 q_ptr=query, k_ptr=keys, dz_ptr=dz, dq_ptr=dq if need_q else dz,
                 B=sh.B, N=sh.N, DK=sh.d_k, n_partials=split, eps_bits=float_bits(eps),
                 stride_qb=query.stride(0), stride_qk=query.stride(1), stride_kn=keys.stride(0),
                 stride_kk=keys.stride(1)),
            dict(SEPARATION=SEPARATION_CODES[separation], NEED_Q=need_q, NC=mem.slot_chunk, BLOCK_B=mem.block_b,
                 BLOCK_K=dq_block_k, SCORE_PRECISION=score_precision, WIDE_SCORES=_wide_scores(sh.ct)),
            num_warps=4, num_stages=2, maxnreg=SCORES_BWD_MAXNREG,
        ))
        if need_k:
            keys_block_k = mem.grad_k
            launches.append(Launch(
                "keys_bwd", kernels._mira_keys_bwd_kernel, (triton_cdiv(sh.N, 16), triton_cdiv(sh.d_k, keys_block_k)),
                dict(dz_ptr=dz, scores_ptr=mixed.scores, q_ptr=query, k_ptr=keys, qnorm_ptr=mixed.qnorm,
                     knorm_ptr=mixed.knorm, dk_ptr=dk, B=sh.B, N=sh.N, DK=sh.d_k, stride_qb=query.stride(0),
                     stride_qk=query.stride(1), stride_kn=keys.stride(0), stride_kk=keys.stride(1)),
                dict(BLOCK_N=16, BLOCK_B=16, BLOCK_K=keys_block_k, SCORE_PRECISION=score_precision),
                num_warps=4, num_stages=2,
            ))
    for need, name, dmixed, out, f in ((need_a, "bank_bwd_a", dmixed_a, da, sh.fa),
                                       (need_b, "bank_bwd_b", dmixed_b, db, sh.fb)):
        if not (need and has_lora):
            continue
        n_tiles = triton_cdiv(sh.N, 16)
        split = configs.split_for(n_tiles, triton_cdiv(f, 64))
        launches.append(Launch(
            name, kernels._mira_bank_bwd_kernel, (n_tiles, split),
            dict(w_ptr=mixed.weights, d_ptr=dmixed, out_ptr=out, B=sh.B, N=sh.N, F=f),
            dict(BLOCK_N=16, BLOCK_B=16, BLOCK_F=64, LORA_PRECISION=_accurate(lora_precision)),
            num_warps=4, num_stages=2,
        ))
    return grads, launches
