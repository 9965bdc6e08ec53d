"""Triton kernels of the MIRA ops (NVIDIA GPUs; numerics checked with the Triton interpreter).

Notation (docs of :mod:`mira_kernels.reference`): B samples, T tokens, M = B*T rows, N slots,
S slices, r rank, d_in / d_out / d_s / d_k widths. ``ct`` is the compute dtype: float32 for
16-bit x, else x's dtype. Every kernel reads its ct from an output or workspace pointer.

Design (forward, two launches, no atomics, grids from shapes only):

1. ``_mira_retrieve_kernel``: cosine scores, separation and mixing, computed once per tile of 16
   samples. Program (tile, share) computes its tile's (16, N) scores with ``tl.dot`` (slots in
   chunks: any N), separates them in registers and mixes its share of the banks' flattened columns
   with a second ``tl.dot`` (weights (16, N) @ bank (N, F)): the banks are read once per 16 samples.
   The mixed factors are stored in the adapter's operand dtype (contract section 11).
2. ``_mira_gemm_kernel``: the base GEMM x W^T with the whole adapter fused in. The shrink h = x A_b^T
   is folded into the main loop of a program's first adapted output tile (the x tile is already
   loaded: one extra (BLOCK_M, 16) dot per K step), for the row block's samples at once; the expand
   h B_b^T is added to the same accumulator (LoRAFusion style), then the bias, and the tile is
   rounded once to x's dtype. Programs visit the column tiles no slice touches first; on Hopper the
   GEMM is launched with programmatic dependent launch and waits for the retrieval (``gdc_wait``)
   only before its first adapted tile, so the retrieval runs under the GEMM's first tiles.

Wide adapters (a row block's samples x S*r above ``configs.MAX_FUSED_J``: large ranks, or short
sequences packing many samples per block) and fp32 factors (fp16, fp32 and fp64 x: the folded
shrink spills with fp32 operands) get a third launch between the two, ``_mira_shrink_fwd_kernel``,
and the GEMM reads h from it. At small batch on Hopper (``configs.SHRINK_BESIDE_ROWS``: ViT-B/16 at
B <= 2, whose small GEMM programs fit beside the others on an SM) the three launches are chained by
programmatic dependent launch: the shrink starts with the retrieval and waits for its factors, the
GEMM starts with both and waits only after its main loop (which needs neither), before the expand,
so the retrieval and the shrink run beside the base product instead of before it.

Backward reuses the GEMM with other roles (dx = G W + scale sum_s dh_s A_b, keeping
dh = scale G_s B_b) and the shrink (h = x A_b^T for dB), and adds: per-sample reductions over T in
a fixed order (``_mira_factor_bwd_kernel`` for dA_b and dB_b); dw = <dA_b, bank_a> + <dB_b, bank_b>
as a two-pass reduction (``_mira_dw_bwd_kernel`` partials per bank column share, summed in order by
``_mira_scores_bwd_kernel``, which also applies the separation and cosine backward and writes
dquery); ``_mira_keys_bwd_kernel`` (dkeys, a reduction over B in a fixed order) and
``_mira_bank_bwd_kernel`` (dbank = w^T dF). No atomics anywhere: bitwise reproducible.

Precision (the rules and their error bounds: docs/contract.md section 11). Base products of 16-bit
x run on tensor cores with fp32 accumulation; for bf16 x the mixed A_b is stored in bf16 and the
shrink runs on bf16 operands, while h and B_b stay fp32 and are rounded to nearest TF32 for a TF32
expand (EXPAND_TF32: in bf16 their roundings took the output to 2x PyTorch's error); for fp16 x the
factors stay fp32 (fp16's range would overflow where the reference does not) and the adapter's
products are 3xTF32 (one TF32 product, 10 bits of h and B_b, cost fp16 outputs several ulp where the
adapter dominates). With fp32 x and
``torch.backends.cuda.matmul.allow_tf32`` the GEMM's products are TF32. Scores and mixing use
"tf32x3" (three TF32 products, about fp32 accuracy) wherever the adapter may use TF32. Otherwise
(fp32 x by default, fp64) every dot is "ieee". The backward of fp32 ct recomputes the cosines, their
affine sum and the weights in fp64 (WIDE_SCORES) and runs dw on FMA units ("ieee"): dquery and
dkeys scale the affine sum's error by about 1/sum^2 (contract section 11). Every ``tl.dot`` names its ``out_dtype`` (the
accumulator's): Triton 3.6 defaults it to fp32, which breaks the fp64 path; 3.8 infers it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Separation codes (constexpr): the order of mira_kernels.reference.SEPARATIONS.
AFFINE: tl.constexpr = tl.constexpr(0)
SOFTMAX: tl.constexpr = tl.constexpr(1)
RELU: tl.constexpr = tl.constexpr(2)
TANH: tl.constexpr = tl.constexpr(3)
SIGMOID: tl.constexpr = tl.constexpr(4)
IDENTITY: tl.constexpr = tl.constexpr(5)

# Norm floor of the cosine, as torch.nn.functional.normalize (reference.NORM_EPS).
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)


@triton.jit
def _tanh(v):
    # tanh through exp of a non-positive argument: no overflow, and libdevice-free so the
    # interpreter runs the same code.
    e = tl.exp(-2.0 * tl.abs(v))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(v < 0, -t, t)


@triton.jit
def _f64(bits):
    # A Python float that must keep float64 precision travels as its IEEE-754 bit pattern (an
    # int64): Triton types float arguments as fp32, which would round scale and eps on the fp64 path.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _cosine_sums(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb, stride_qk, stride_kn, stride_kk,
                 q_scale, k_scale, BLOCK_B: tl.constexpr, NC: tl.constexpr, BLOCK_K: tl.constexpr,
                 st: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr, SCALED: tl.constexpr,
                 DOTS: tl.constexpr = True, SQUARES: tl.constexpr = True):
    """One pass over d_k: q.k (BLOCK_B, NC) if DOTS, |q|^2 (BLOCK_B,) and |k|^2 (NC,) if SQUARES (zeros
    otherwise), in st; each row of q and of k multiplied by its q_scale / k_scale (a power of two, so
    exactly) when SCALED."""
    if PRECISION == "fma":
        dots, q_sq, k_sq = _cosine_sums_deferred(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb,
                                                 stride_qk, stride_kn, stride_kk, q_scale, k_scale, BLOCK_B, NC,
                                                 BLOCK_K, st, SCALED, DOTS, SQUARES)
    else:
        dots, q_sq, k_sq = _cosine_sums_stepwise(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb,
                                                 stride_qk, stride_kn, stride_kk, q_scale, k_scale, BLOCK_B, NC,
                                                 BLOCK_K, st, PRECISION, WIDE, SCALED, DOTS, SQUARES)
    return dots, q_sq, k_sq


@triton.jit
def _qk_step(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, k0, DK, stride_qb, stride_qk, stride_kn, stride_kk,
             q_scale, k_scale, BLOCK_K: tl.constexpr, st: tl.constexpr, SCALED: tl.constexpr):
    # The query rows' and keys' columns [k0, k0 + BLOCK_K) in st, each row times its scale when SCALED.
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < DK
    qt = tl.load(q_ptr + rows64[:, None] * stride_qb + cols[None, :] * stride_qk,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(st)
    kt = tl.load(k_ptr + slots64[:, None] * stride_kn + cols[None, :] * stride_kk,
                 mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(st)
    if SCALED:
        qt = qt * q_scale[:, None]
        kt = kt * k_scale[:, None]
    return qt, kt


@triton.jit
def _cosine_sums_stepwise(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb, stride_qk, stride_kn,
                          stride_kk, q_scale, k_scale, BLOCK_B: tl.constexpr, NC: tl.constexpr,
                          BLOCK_K: tl.constexpr, st: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
                          SCALED: tl.constexpr, DOTS: tl.constexpr, SQUARES: tl.constexpr):
    # Each step's products reduced in the step: tl.dot with PRECISION, or (WIDE) fp64 FMA products.
    dots = tl.zeros((BLOCK_B, NC), dtype=st)
    q_sq = tl.zeros((BLOCK_B,), dtype=st)
    k_sq = tl.zeros((NC,), dtype=st)
    for k0 in range(0, DK, BLOCK_K):
        qt, kt = _qk_step(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, k0, DK, stride_qb, stride_qk, stride_kn,
                          stride_kk, q_scale, k_scale, BLOCK_K, st, SCALED)
        if DOTS and WIDE:
            # fp64 products on FMA units, not tl.dot: Triton (3.6, 3.8) cannot lower an fp64 dot whose
            # operand was loaded as 16 bits (the backward of a bf16 / fp16 CLS query; "fp64 don't support
            # largeK MMA", an abort in the sm_80 / sm_90 MMA lowering). The work is B N d_k, tiny.
            dots += tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
        elif DOTS:
            dots = tl.dot(qt, tl.trans(kt), dots, input_precision=PRECISION, out_dtype=dots.dtype)
        if SQUARES:
            q_sq += tl.sum(qt * qt, axis=1)
            k_sq += tl.sum(kt * kt, axis=1)
    return dots, q_sq, k_sq


@triton.jit
def _cosine_sums_deferred(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb, stride_qk, stride_kn,
                          stride_kk, q_scale, k_scale, BLOCK_B: tl.constexpr, NC: tl.constexpr,
                          BLOCK_K: tl.constexpr, st: tl.constexpr, SCALED: tl.constexpr, DOTS: tl.constexpr,
                          SQUARES: tl.constexpr):
    """_cosine_sums on FMA units with every reduction deferred past the d_k loop ("fma" precision).

    Each thread keeps running sums per (row, slot, lane of the step): a step is only loads and
    FMAs, and the cross-lane reductions (shuffles, shared memory) run once at the end instead of
    once per step. The sums are st's (fp32, or fp64 for WIDE: products rounded to st as "ieee" dots
    round them; fp32 is at least as accurate as 3xTF32), in a different order: lane sums over d_k / BLOCK_K
    steps, then a tree over the lanes. Why: at small batch the retrieval is issue-bound in this loop
    (Nsight Compute, H200, B = 1: one warp per scheduler, an instruction every 5.3 cycles) and the
    per-step reductions were most of its 700+ instructions per 64-wide step (sm_90 SASS).
    The (BLOCK_B, NC, BLOCK_K) product tile is held in registers: configs._retrieve_config bounds
    BLOCK_B * NC * BLOCK_K (SMALL_BATCH_PRODUCTS).
    """
    prods = tl.zeros((BLOCK_B, NC, BLOCK_K), dtype=st)
    q_lanes = tl.zeros((BLOCK_B, BLOCK_K), dtype=st)
    k_lanes = tl.zeros((NC, BLOCK_K), dtype=st)
    for k0 in range(0, DK, BLOCK_K):
        qt, kt = _qk_step(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, k0, DK, stride_qb, stride_qk, stride_kn,
                          stride_kk, q_scale, k_scale, BLOCK_K, st, SCALED)
        if DOTS:
            prods += qt[:, None, :] * kt[None, :, :]
        if SQUARES:
            q_lanes += qt * qt
            k_lanes += kt * kt
    return tl.sum(prods, axis=2), tl.sum(q_lanes, axis=1), tl.sum(k_lanes, axis=1)


# Where |u|^2 overflows (|u| > ~1.8e19 in fp32, a bf16 or fp32 query or key; > ~1.3e154 in fp64),
# the row is rescored scaled by a power of two that brings every finite row's squares back in range
# (fp32: 3.4e38 * 2^-80 ~ 2.8e14, and 1e5 such squares sum to < 3.4e38; fp64: 1.8e308 * 2^-600 ~
# 4e127) while a row that overflowed, whose largest entry is at least |u| / sqrt(d_k), keeps normal
# squares (fp32: 5.8e16 * 2^-80 ~ 5e-8 at d_k = 1e5; fp64: 4e151 * 2^-600 ~ 1e-29).
OVERFLOW_SCALE_F32: tl.constexpr = tl.constexpr(2.0**-80)
OVERFLOW_SCALE_F64: tl.constexpr = tl.constexpr(2.0**-600)


@triton.jit
def _cosines(q_ptr, k_ptr, rows, row_ok, slots, slot_ok, DK, stride_qb, stride_qk, stride_kn, stride_kk,
             BLOCK_B: tl.constexpr, NC: tl.constexpr, BLOCK_K: tl.constexpr, ct: tl.constexpr,
             PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Cosines of the queries ``rows`` to the keys ``slots``: (BLOCK_B, NC) scores, |q| (BLOCK_B,), |k| (NC,).

    WIDE: everything in fp64 (products and sums on FMA units; the results are fp64), for the
    backward of fp32 ct (see ``_mira_retrieve_kernel``); else in ct with PRECISION. Exact norms
    either way (contract section 2): in ct, a program whose |q|^2 or |k|^2 overflowed sums the squares
    again with those rows scaled by OVERFLOW_SCALE_*, and the dots too if one of them overflowed (an
    inf entry stays inf, so its cosines are NaN, as the reference's u / |u|); the cosines are the
    unscaled rows' bit for bit. Other programs never take that branch.
    """
    st = tl.float64 if WIDE else ct
    rows64 = rows.to(tl.int64)
    slots64 = slots.to(tl.int64)
    floor = tl.full((), NORM_EPS, st)
    dots, q_sq, k_sq = _cosine_sums(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb, stride_qk,
                                    stride_kn, stride_kk, None, None, BLOCK_B, NC, BLOCK_K, st, PRECISION, WIDE,
                                    False)
    q_norm = tl.sqrt(q_sq)
    k_norm = tl.sqrt(k_sq)
    scores = dots / tl.maximum(q_norm, floor)[:, None] / tl.maximum(k_norm, floor)[None, :]
    if not WIDE:
        # Rows whose squares overflowed: their norms again, scaled (exact). The dots need it only where
        # q.k may have overflowed too (|q| |k| near the range); they are then recomputed scaled as well.
        # Two passes of one kind each, not one of both: the 16-bit forward's retrieval has no registers
        # to spare (with one pass of both, 8 bytes of stack on sm_90 at 255 registers).
        if (tl.max(q_sq, axis=0) == float("inf")) | (tl.max(k_sq, axis=0) == float("inf")):
            # tl.full, not a Python float: Triton would type the literal fp32 (2^-600 is 0 there).
            if st == tl.float64:
                over = tl.full((), OVERFLOW_SCALE_F64, st)
                half_range = tl.full((), 2.0**1023, st)
            else:
                over = tl.full((), OVERFLOW_SCALE_F32, st)
                half_range = tl.full((), 2.0**127, st)
            q_scale = tl.where(q_sq == float("inf"), over, 1.0).to(st)
            k_scale = tl.where(k_sq == float("inf"), over, 1.0).to(st)
            unused, q_sq, k_sq = _cosine_sums(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK, stride_qb,
                                              stride_qk, stride_kn, stride_kk, q_scale, k_scale, BLOCK_B, NC,
                                              BLOCK_K, st, PRECISION, WIDE, True, False, True)
            q_root = tl.sqrt(q_sq)
            k_root = tl.sqrt(k_sq)
            q_norm = q_root / q_scale  # exact: a power of two
            k_norm = k_root / k_scale
            # |q.k| <= |q| |k| (Cauchy-Schwarz, and so are the partial sums): below half the range, no dot
            # overflowed (inf, or NaN where overflowed terms of both signs met).
            if tl.max(q_norm, axis=0) * tl.max(k_norm, axis=0) >= half_range:
                dots, unused_q, unused_k = _cosine_sums(q_ptr, k_ptr, rows64, row_ok, slots64, slot_ok, DK,
                                                        stride_qb, stride_qk, stride_kn, stride_kk, q_scale,
                                                        k_scale, BLOCK_B, NC, BLOCK_K, st, PRECISION, WIDE, True,
                                                        True, False)
                # The scaled rows' cosines (each floor scaled alike): rows of scale 1 as in the first pass.
                q_den = tl.maximum(q_root, floor * q_scale)
                scores = dots / q_den[:, None] / tl.maximum(k_root, floor * k_scale)[None, :]
            else:
                # q.k over the true norms: an exact rescaling of the scaled rows' cosines.
                scores = dots / tl.maximum(q_norm, floor)[:, None] / tl.maximum(k_norm, floor)[None, :]
    return tl.where(row_ok[:, None] & slot_ok[None, :], scores, 0.0), q_norm, k_norm


@triton.jit
def _weights(scores, valid, denom, top, expsum, N, SEPARATION: tl.constexpr):
    """sep(scores) for one chunk of slots, given the row statistics over all N slots: the affine
    guard's denominator (``_mira_retrieve_kernel``), and the softmax maximum and sum of exp(s - max)."""
    if SEPARATION == AFFINE:
        # N = 1 keeps the raw cosine.
        weights = tl.where(N == 1, scores, scores / denom[:, None])
    elif SEPARATION == SOFTMAX:
        e = tl.where(valid, tl.exp(scores - top[:, None]), 0.0)
        weights = e / tl.where(expsum > 0, expsum, 1.0)[:, None]
    elif SEPARATION == RELU:
        weights = tl.maximum(scores, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch
    elif SEPARATION == TANH:
        weights = _tanh(scores)
    elif SEPARATION == SIGMOID:
        weights = tl.sigmoid(scores)
    else:
        weights = scores
    return tl.where(valid, weights, 0.0)


@triton.jit(do_not_specialize=["eps_bits"])
def _mira_retrieve_kernel(
    q_ptr, k_ptr, bank_a_ptr, bank_b_ptr, mixed_a_ptr, mixed_b_ptr,
    scores_ptr, weights_ptr, qnorm_ptr, knorm_ptr, scratch_ptr, total_ptr, branch_ptr, denom_ptr,
    B, N, DK, FA, FB, eps_bits,
    stride_qb, stride_qk, stride_kn, stride_kk,
    SEPARATION: tl.constexpr, SAVE_STATS: tl.constexpr, NC: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, SCORE_PRECISION: tl.constexpr,
    MIX_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, WIDE_SCORES: tl.constexpr,
    SAVE_TOTAL: tl.constexpr = False, FWD_BRANCH: tl.constexpr = False, MIX: tl.constexpr = True,
):
    """Retrieval: cosine scores, separation and mixing, A_b = sum_n w[b,n] bank_a[n] (and B_b).

    Shapes: q (B, DK), keys (N, DK), banks read as flat rows (N, FA) and (N, FB) with FA = S*r*d_in,
    FB = S*d_s*r; mixed outputs (B, FA), (B, FB) in the adapter's operand dtype (rounded once, from
    fp32 sums: contract section 11). Any N: slots are taken NC at a time; with one chunk (ONE_CHUNK:
    N <= NC) the scores stay in registers, otherwise a first pass gathers the row statistics over all
    chunks (affine sum; softmax maximum and sum) and parks the scores in this program's own
    ``scratch`` rows (BLOCK_B, N), read back by the mixing pass. SAVE_STATS stores scores, weights
    (B, N) and the norms for the backward (program column 0 only).

    Grid: (cdiv(B, BLOCK_B), SPLIT); program (i, j) mixes column chunks j, j+SPLIT, ... of both banks
    for samples [16i, 16i+16). With USE_PDL (Hopper) it lets the fused GEMM launch at once: the GEMM
    overlaps this kernel and waits (gdc_wait) only where it first reads the mixed factors.

    WIDE_SCORES (the backward's recompute, fp32 ct): cosines, the row statistics (the affine sum)
    and the weights in fp64, each rounded once to ct where it is stored or mixed. dquery and dkeys
    scale the affine sum's error by about 1/sum^2: near the guard (|sum| just above eps) fp32
    cosines, and tensor cores' 3xTF32 ones far more, left dquery several times PyTorch's error
    (contract section 11).

    The affine guard (sign-preserving clamp of the denominator d = sum_n s: ``|d| >= eps`` keeps d,
    else sign(d) eps, sign(0) = +): SAVE_TOTAL stores this program's d (B,) in ``total``'s dtype
    (st: exact); FWD_BRANCH takes the branch and the clamp's sign from ``branch`` instead, the forward's
    own d (compared with eps in its dtype, as the forward did), so that the backward's fp64 recompute
    differentiates the function the forward evaluated (its d, and the forward's, can fall on two sides
    of eps); SAVE_STATS also stores the denominator used (B,) in ``denom`` (st) for the scores backward.
    MIX = False (the backward's replay of the forward's sums, with SAVE_TOTAL): no mixing, no factors.
    """
    if USE_PDL:
        gdc_launch_dependents()
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    n_split = tl.num_programs(1)
    ct = scores_ptr.dtype.element_ty
    st = tl.float64 if WIDE_SCORES else ct
    eps = _f64(eps_bits).to(st)

    local = tl.arange(0, BLOCK_B)
    rows = pid_b * BLOCK_B + local
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, NC)
    first = pid_f == 0
    scratch = scratch_ptr + (pid_b * n_split + pid_f).to(tl.int64) * BLOCK_B * N

    # Row statistics over every slot (one pass per chunk of NC slots).
    total = tl.zeros((BLOCK_B,), dtype=st)
    top = tl.full((BLOCK_B,), float("-inf"), dtype=st)
    expsum = tl.zeros((BLOCK_B,), dtype=st)
    scores = tl.zeros((BLOCK_B, NC), dtype=st)
    for c0 in range(0, N, NC):
        slots = c0 + lanes
        slot_ok = slots < N
        valid = row_ok[:, None] & slot_ok[None, :]
        scores, q_norm, k_norm = _cosines(q_ptr, k_ptr, rows, row_ok, slots, slot_ok, DK, stride_qb, stride_qk,
                                          stride_kn, stride_kk, BLOCK_B, NC, BLOCK_K, ct, SCORE_PRECISION,
                                          WIDE_SCORES)
        total += tl.sum(scores, axis=1)
        chunk_top = tl.max(tl.where(valid, scores, float("-inf")), axis=1)
        new_top = tl.maximum(top, chunk_top)
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # N = 0 or a padding row
        expsum = expsum * tl.exp(top - safe) + tl.sum(tl.where(valid, tl.exp(scores - safe[:, None]), 0.0), axis=1)
        top = new_top
        if not ONE_CHUNK:
            tl.store(scratch + local[:, None] * N + slots[None, :], scores.to(ct), mask=valid)
        if SAVE_STATS:
            tl.store(qnorm_ptr + rows, q_norm.to(ct), mask=row_ok & first & (c0 == 0))
            tl.store(knorm_ptr + slots, k_norm.to(ct), mask=slot_ok & first & (pid_b == 0))
    top = tl.where(top == float("-inf"), 0.0, top)
    keep = tl.abs(total) >= eps
    positive = total >= 0
    if SAVE_TOTAL:
        tl.store(total_ptr + rows, total.to(total_ptr.dtype.element_ty), mask=row_ok & first)
    if FWD_BRANCH:
        fwd_total = tl.load(branch_ptr + rows, mask=row_ok, other=0.0)
        keep = tl.abs(fwd_total) >= _f64(eps_bits).to(branch_ptr.dtype.element_ty)
        positive = fwd_total >= 0
    denom = tl.where(keep, total, tl.where(positive, eps, -eps))
    if SAVE_STATS:
        tl.store(denom_ptr + rows, denom.to(denom_ptr.dtype.element_ty), mask=row_ok & first)
    if not ONE_CHUNK:
        tl.debug_barrier()  # the scratch rows are read back by other threads of this program

    if SAVE_STATS:
        for c0 in range(0, N, NC):
            slots = c0 + lanes
            valid = row_ok[:, None] & (slots < N)[None, :]
            if not ONE_CHUNK:
                scores = tl.load(scratch + local[:, None] * N + slots[None, :], mask=valid,
                                 other=0.0).to(st)
            w = _weights(scores, valid, denom, top, expsum, N, SEPARATION)
            out_bn = rows64[:, None] * N + slots[None, :]
            tl.store(scores_ptr + out_bn, scores.to(ct), mask=valid & first)
            tl.store(weights_ptr + out_bn, w.to(ct), mask=valid & first)

    if MIX:  # (not the backward's replay of the forward's sums: its mixing code alone spilled at B = 256)
        # Mixing: (BLOCK_B, NC) @ (NC, BLOCK_F) per column chunk and slot chunk; padding slots weigh 0.
        w_one = _weights(scores, row_ok[:, None] & (lanes < N)[None, :], denom, top, expsum, N, SEPARATION).to(ct)
        _mix(bank_a_ptr, mixed_a_ptr, FA, w_one, scratch, local, rows64, row_ok, lanes, denom, top, expsum, N,
             pid_f, n_split, SEPARATION, NC, ONE_CHUNK, BLOCK_B, BLOCK_F, MIX_PRECISION)
        _mix(bank_b_ptr, mixed_b_ptr, FB, w_one, scratch, local, rows64, row_ok, lanes, denom, top, expsum, N,
             pid_f, n_split, SEPARATION, NC, ONE_CHUNK, BLOCK_B, BLOCK_F, MIX_PRECISION)


@triton.jit
def _mix(bank_ptr, out_ptr, F, w_one, scratch, local, rows64, row_ok, lanes, denom, top, expsum, N, pid_f,
         n_split, SEPARATION: tl.constexpr, NC: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
         BLOCK_F: tl.constexpr, MIX_PRECISION: tl.constexpr):
    # out[b, f] = sum_n w[b, n] bank[n, f] for this program's column chunks (pid_f, pid_f + n_split, ...).
    ct = w_one.dtype
    for f0 in range(pid_f * BLOCK_F, F, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < F
        mixed = tl.zeros((BLOCK_B, BLOCK_F), dtype=ct)
        for c0 in range(0, N, NC):
            slots = c0 + lanes
            slot_ok = slots < N
            if ONE_CHUNK:
                w = w_one
            else:
                valid = row_ok[:, None] & slot_ok[None, :]
                s = tl.load(scratch + local[:, None] * N + slots[None, :], mask=valid, other=0.0)
                w = _weights(s, valid, denom, top, expsum, N, SEPARATION).to(ct)
            bank = tl.load(bank_ptr + slots.to(tl.int64)[:, None] * F + fcols[None, :],
                           mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
            mixed = tl.dot(w, bank, mixed, input_precision=MIX_PRECISION, out_dtype=mixed.dtype)
        tl.store(out_ptr + rows64[:, None] * F + fcols[None, :], mixed.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _expand(acc, h, e, t_sample, t_slice, row_sample, cols, S: tl.constexpr, OFFS: tl.constexpr, WIDTH,
            SLICED: tl.constexpr, SAMPLES: tl.constexpr, PRECISION: tl.constexpr, H_LATER: tl.constexpr):
    """acc + h e for the stacked expand: h (BLOCK_M, J) holds each row's shrink in its own sample's
    columns t (``t_sample[t]``, relative to the row block; zero elsewhere), e (J, BLOCK_N) each
    sample's factor rows, zero outside the slices' columns; ``row_sample``: each row's sample (-1:
    none). Returns (acc, whether h has an inf or NaN).

    H_LATER: h's non-finite entries are not marked here but by the work item's second pass
    (``_expand_rescue``), which also adds what they stand for where only scale * h overflowed.

    One dot is exact only while h and e are finite: their zeros times NaN or inf make NaN where the
    reference adds nothing (another sample's rows, another slice's columns). So the dot takes the
    finite values, and the entries the reference makes non-finite are set to NaN: a row's slice s
    columns when its h of slice s is non-finite, a column on a sample's rows when that sample's
    factor has a non-finite value in it. The marks go straight into the accumulator, one (rows,
    columns) vector pair at a time, in a branch taken only when a value is non-finite: a
    (BLOCK_M, BLOCK_N) mask or a second accumulator beside it spilled (sm_80 and sm_90).
    """
    h_ok = h * 0.0 == 0.0
    e_ok = e * 0.0 == 0.0
    acc = tl.dot(tl.where(h_ok, h, 0.0).to(h.dtype), tl.where(e_ok, e, 0.0).to(e.dtype), acc,
                 input_precision=PRECISION, out_dtype=acc.dtype)
    h_bad = tl.sum(tl.where(h_ok, 0, 1))
    if h_bad + tl.sum(tl.where(e_ok, 0, 1)) > 0:
        if not H_LATER:
            for s in tl.static_range(S):
                bad = tl.max(tl.where(h_ok | (t_slice != s)[None, :], 0, 1), axis=1) > 0
                inside = cols >= 0
                if SLICED:
                    inside = (cols >= OFFS[s]) & (cols < OFFS[s] + WIDTH)
                acc = tl.where(bad[:, None] & inside[None, :], float("nan"), acc)
        for p in tl.static_range(SAMPLES):
            bad = tl.max(tl.where(e_ok | (t_sample != p)[:, None], 0, 1), axis=0) > 0
            acc = tl.where((row_sample == p)[:, None] & bad[None, :], float("nan"), acc)
    return acc, h_bad > 0


@triton.jit
def _expand_rescue(acc, h, lost, e_ptr, b, t, J, R, stride_eb, stride_es, stride_er, stride_en, cols, E_WIDTH, scale,
                   S: tl.constexpr, OFFS: tl.constexpr, E_SLICED: tl.constexpr):
    """acc + scale (h e) on the rows ``lost``, for column t of h (the rows' h of sample b, unscaled,
    (BLOCK_M,)) and row t of sample b's expand factor: the terms the expand's dot left out, and did not
    mark, where its operand scale * h was not finite.

    The reference applies scale last, to h B_b^T: with |h| ~ 1e10 and |B_b| ~ 1e-20, scale = 1e30 is
    finite there (1e20) where scale * h is inf in fp32. So here each term is h e first, then times
    scale, on FMA units in acc's dtype, a rank-1 update (no second accumulator beside acc). Where h
    itself is not finite the terms are NaN or inf, as the reference's: those are the marks. A NaN or
    inf in e was marked by the dot's pass already.
    """
    p, s, rr, off = _stacked(t, J, R, S, OFFS, E_SLICED)
    local = cols - off
    e_in = (local >= 0) & (local < E_WIDTH)
    e_row = e_ptr + (tl.cast(b, tl.int64) * stride_eb + s * stride_es + rr * stride_er)
    e = tl.load(e_row + local.to(tl.int64) * stride_en, mask=e_in, other=0.0).to(acc.dtype)
    return tl.where(lost[:, None] & e_in[None, :], acc + (h[:, None] * e[None, :]) * scale, acc)


@triton.jit
def _tf32_hi(v):
    # v (fp32) with its low 13 mantissa bits cleared: exact in TF32, and v - hi is exact in fp32.
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_round(v):
    # v (fp32) rounded to the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32): a TF32 dot
    # then reads it exactly, where the tensor cores alone would truncate (twice the error), and the
    # interpreter, whose dot ignores input_precision, computes the same products. Non-finite values are
    # kept (the expand takes them out of the dot), and a value that would round up past the largest
    # finite one is truncated instead: rounding may not create an inf the fp32 value does not have.
    bits = v.to(tl.uint32, bitcast=True)
    up = (bits + 0x1000) & 0xFFFFE000
    finite = (bits & 0x7F800000) != 0x7F800000
    fits = (up & 0x7F800000) != 0x7F800000
    out = tl.where(finite & fits, up, tl.where(finite, bits & 0xFFFFE000, bits))
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _expand_operand(v, EXPAND_TF32: tl.constexpr, op_ty: tl.constexpr):
    # An operand of the expand (h or B_b): rounded to nearest TF32 in fp32 for bf16 x, else op_ty. (One
    # return: Triton types every return of a function alike, the constexpr branch not taken included.)
    if EXPAND_TF32:
        out = _tf32_round(v.to(tl.float32))
    else:
        out = v.to(op_ty)
    return out


@triton.jit
def _row_block(row0, M, T, BLOCK_M: tl.constexpr):
    """The rows of a block of BLOCK_M token rows starting at row0: their indices (also as int64:
    row offsets times a row stride can pass 2^31, and Triton types ints as i32), which are inside
    the M rows, each row's sample (T tokens per sample), and the first and last sample they touch."""
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < M
    row_sample = rows // T
    b_first = row0 // T
    b_last = (tl.minimum(row0 + BLOCK_M, M) - 1) // T
    return rows, rows64, row_ok, row_sample, b_first, b_last


@triton.jit
def _pick(index, VALUES: tl.constexpr, COUNT: tl.constexpr):
    # VALUES[index] for a run-time index into a compile-time tuple (e.g. a program's slice offset,
    # static per layer) without a device-side table.
    out = index * 0
    for i in tl.static_range(COUNT):
        out = tl.where(index == i, VALUES[i], out)
    return out


@triton.jit
def _stacked(t, J, R, S: tl.constexpr, OFFS: tl.constexpr, SLICED: tl.constexpr):
    # Index t of the stacked adapter axis (sample slot p of the row block, slice s, rank rr) and the
    # offset of slice s along the sliced axis (0 when the axis is not sliced).
    p = t // J
    j = t % J
    s = j // R
    off = s * 0
    if SLICED:
        for i in tl.static_range(S):
            off = tl.where(s == i, OFFS[i], off)
    return p, s, j % R, off


@triton.jit
def _factor_rows(ptr, b_first, b_last, t, J, R, stride_b, stride_s, stride_r, S: tl.constexpr, OFFS: tl.constexpr,
                 SLICED: tl.constexpr, SPB: tl.constexpr):
    """Row pointers of a per-sample factor stacked over a row block's samples: row t is
    F[b_first + p, s, rr, :] with (p, s, rr) from t; also which rows exist (sample <= b_last, t
    not padding) and each row's slice offset along the long axis (0 unless SLICED)."""
    p, s, rr, off = _stacked(t, J, R, S, OFFS, SLICED)
    b = b_first + p
    ok = (t < SPB * J) & (b <= b_last)
    return ptr + (b.to(tl.int64) * stride_b + s * stride_s + rr * stride_r), ok, off


@triton.jit
def _factor_tile(rows, ok, off, idx, WIDTH, stride_i):
    # (len(rows), len(idx)) tile: rows[t][idx - off_t], zero outside [0, WIDTH) and on missing rows. The
    # position times its stride in 64 bits, as every product on a factor's pointer (its lanes outside
    # [0, WIDTH) are masked, but a 32-bit product would wrap before the mask is applied).
    local = idx[None, :] - off[:, None]
    base = rows - off.to(tl.int64) * stride_i  # per row and per column in 64 bits, not the whole tile
    return tl.load(base[:, None] + (idx.to(tl.int64) * stride_i)[None, :],
                   mask=ok[:, None] & (local >= 0) & (local < WIDTH), other=0.0)


@triton.jit
def _tile_columns(group, i, NOUT, E_WIDTH, S: tl.constexpr, OFFS: tl.constexpr, E_SLICED: tl.constexpr,
                  LORA: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                  ORDER: tl.constexpr, TILES: tl.constexpr):
    """Column tile i of a work item's group: (live, col0, its columns, those it writes, adapted)."""
    n_tile = _pick(group + i * GROUPS, ORDER, TILES * GROUPS)  # -1: past the last tile
    live = n_tile >= 0
    col0 = n_tile * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    adapted = live & (LORA > 0)
    if E_SLICED:
        hit = col0 < 0
        for s in tl.static_range(S):
            hit = hit | ((col0 < OFFS[s] + E_WIDTH) & (col0 + BLOCK_N > OFFS[s]))
        adapted = adapted & hit
    return live, col0, cols, _columns_written(cols, live, NOUT, E_WIDTH, S, OFFS, E_SLICED, IN_PLACE), adapted


@triton.jit
def _columns_written(cols, live, NOUT, E_WIDTH, S: tl.constexpr, OFFS: tl.constexpr, E_SLICED: tl.constexpr,
                     IN_PLACE: tl.constexpr):
    col_ok = (cols < NOUT) & live
    if E_SLICED:
        if IN_PLACE:
            # out is read and written only in the slices' columns: a tile's columns between and after
            # them would come back through acc + 0 and a round trip (-0.0 as +0.0, a signalling NaN
            # quieted), and would race with any other writer of those columns.
            in_slice = cols < 0
            for s in tl.static_range(S):
                in_slice = in_slice | ((cols >= OFFS[s]) & (cols < OFFS[s] + E_WIDTH))
            col_ok = col_ok & in_slice
    return col_ok


@triton.jit
def _shrink_step(a, h_part, f_rows, f_ok, f_off, f_blk, k0, F_WIDTH, stride_fk, op_ty: tl.constexpr,
                 F_SLICED: tl.constexpr, BLOCK_K: tl.constexpr, LORA_PRECISION: tl.constexpr):
    # One K step of the shrink x F^T, as the GEMM's main loop folds it in and as _fold_shrink runs it
    # alone: the factor tile at k0 (gathered per slice, or the next block of a dense F), then one dot.
    # Returns (h_part, the dense F's block pointer advanced past k0).
    if F_SLICED:
        f = _factor_tile(f_rows, f_ok, f_off, k0 + tl.arange(0, BLOCK_K), F_WIDTH, stride_fk)
    else:
        f = tl.load(f_blk, boundary_check=(0, 1), padding_option="zero")
        f_blk = tl.advance(f_blk, (0, BLOCK_K))
    h_part = tl.dot(a.to(op_ty), tl.trans(f.to(op_ty)), h_part, input_precision=LORA_PRECISION,
                    out_dtype=h_part.dtype)
    return h_part, f_blk


@triton.jit
def _fold_shrink(x_ptr, f_ptr, M, K, J, R, NB, F_WIDTH, stride_xm, stride_fb, stride_fs, stride_fr, stride_fk, row0,
                 b_first, b_last, t, acc_ty: tl.constexpr, op_ty: tl.constexpr, S: tl.constexpr, OFFS: tl.constexpr,
                 F_SLICED: tl.constexpr, SPB: tl.constexpr, J_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, LORA_PRECISION: tl.constexpr):
    # The shrink the GEMM's main loop folds in (LORA = 1), on its own: x F^T for the row block's samples,
    # (BLOCK_M, J_PAD) in acc_ty, by the main loop's K steps (_shrink_step: the same operands, steps and order).
    h_part = tl.zeros((BLOCK_M, J_PAD), dtype=acc_ty)
    f_rows, f_ok, f_off = _factor_rows(f_ptr, b_first, b_last, t, J, R, stride_fb, stride_fs, stride_fr, S, OFFS,
                                       F_SLICED, SPB)
    x_blk = tl.make_block_ptr(x_ptr, (M, K), (stride_xm, 1), (row0, 0), (BLOCK_M, BLOCK_K), (1, 0))
    f_blk = tl.make_block_ptr(f_ptr, (NB * J, K), (stride_fr, stride_fk), (b_first * J, 0), (J_PAD, BLOCK_K), (1, 0))
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_blk, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            a = a.to(tl.float32)
        h_part, f_blk = _shrink_step(a, h_part, f_rows, f_ok, f_off, f_blk, k0, F_WIDTH, stride_fk, op_ty, F_SLICED,
                                     BLOCK_K, LORA_PRECISION)
        x_blk = tl.advance(x_blk, (0, BLOCK_K))
    return h_part


@triton.jit
def _gemm_work_item(
    item,
    x_ptr, w_ptr, bias_ptr, f_ptr, e_ptr, out_ptr, h_ptr, x_desc, w_desc, out_desc,
    M, NOUT, K, T, J, R, NB, F_WIDTH, E_WIDTH, scale_bits,
    stride_xm, stride_wk, stride_wn, stride_bias, stride_om,
    stride_fb, stride_fs, stride_fr, stride_fk, stride_eb, stride_es, stride_er, stride_en,
    S: tl.constexpr, OFFS: tl.constexpr, F_SLICED: tl.constexpr, E_SLICED: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, IN_PLACE: tl.constexpr,
    STORE_H: tl.constexpr, SPB: tl.constexpr, J_PAD: tl.constexpr, J_CHUNK: tl.constexpr,
    J_STEP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
    LEAD_GROUPS: tl.constexpr,
    ORDER: tl.constexpr, TILES: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    EXPAND_PRECISION: tl.constexpr, EXPAND_TF32: tl.constexpr, UPCAST: tl.constexpr, W_ORDER: tl.constexpr,
    USE_PDL: tl.constexpr, TMA: tl.constexpr, OVERFLOW_PASS: tl.constexpr,
):
    """One work item of ``_mira_gemm_kernel``: row block ``item // GROUPS``, its column tiles of group
    ``item % GROUPS`` (a separate function so that the one-item launch compiles exactly as before the
    persistent one existed: a loop around this body raised registers and spilled, sm_80 and sm_90)."""
    if LEAD_GROUPS > 0 and LEAD_GROUPS < GROUPS:
        # The items of the LEAD_GROUPS groups whose first tile has no adapter come first, for every row
        # block, then the others: launched in this order, the first waves need nothing from the
        # retrieval, which runs beside them (PDL) instead of holding adapted programs at their start.
        lead = tl.cdiv(M, BLOCK_M) * LEAD_GROUPS
        rest = item - lead
        pm = tl.where(item < lead, item // LEAD_GROUPS, rest // (GROUPS - LEAD_GROUPS))
        group = tl.where(item < lead, item % LEAD_GROUPS, LEAD_GROUPS + rest % (GROUPS - LEAD_GROUPS))
    else:
        pm = item // GROUPS
        group = item % GROUPS
    acc_ty = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    op_ty = tl.float32 if UPCAST else f_ptr.dtype.element_ty  # the shrink's operand dtype
    # The expand's: fp32 rounded to TF32 for bf16 x (EXPAND_TF32, contract section 11), else the shrink's.
    ex_ty = tl.float32 if EXPAND_TF32 else op_ty
    scale = _f64(scale_bits).to(acc_ty)

    row0 = pm * BLOCK_M
    rows, rows64, row_ok, row_sample, b_first, b_last = _row_block(row0, M, T, BLOCK_M)
    t = tl.arange(0, J_PAD)

    h = tl.zeros((BLOCK_M, J_PAD), dtype=ex_ty)
    h_ready = item < 0  # False: no tile of this work item has computed h yet
    # Where scale * h overflows a finite h, the expand's dot leaves those terms out (unmarked) and a
    # second pass over the work item's stored tiles adds them, scale applied last (_expand_rescue).
    # Not with TMA stores (asynchronous: the second pass could not read them back): NaN there, as before.
    # OVERFLOW_PASS: the plan's choice (off for the backward's dx, where the reference's own
    # scale * (G B) overflows alike: there the pass only added registers, and a spill on sm_90).
    RESCUE: tl.constexpr = LORA > 0 and not TMA and OVERFLOW_PASS
    RESCUE_N: tl.constexpr = min(BLOCK_N, 32)
    rescue = item < 0  # whether a tile left terms to the second pass
    for i in range(0, TILES):
        live, col0, cols, col_ok, adapted = _tile_columns(group, i, NOUT, E_WIDTH, S, OFFS, E_SLICED, LORA, IN_PLACE,
                                                          BLOCK_N, GROUPS, ORDER, TILES)
        shrink_here = adapted & (LORA == 1) & (h_ready == 0)
        if USE_PDL and LORA == 1:
            if adapted:
                gdc_wait()  # the main loop's shrink reads the mixed A_b of the retrieval launch

        if IN_PLACE:
            acc = tl.load(out_ptr + rows64[:, None] * stride_om + cols[None, :],
                          mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(acc_ty)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
        x_blk = tl.make_block_ptr(x_ptr, (M, K), (stride_xm, 1), (row0, 0), (BLOCK_M, BLOCK_K), (1, 0))
        w_blk = tl.make_block_ptr(w_ptr, (K, NOUT), (stride_wk, stride_wn), (0, col0), (BLOCK_K, BLOCK_N), W_ORDER)
        if shrink_here:
            # The main loop with the shrink folded in: one extra (BLOCK_M, J_PAD) dot per K step.
            own = (row_sample[:, None] - b_first) == (t // J)[None, :]  # a row's own sample's columns
            h_part = tl.zeros((BLOCK_M, J_PAD), dtype=acc_ty)
            f_rows, f_ok, f_off = _factor_rows(f_ptr, b_first, b_last, t, J, R, stride_fb, stride_fs, stride_fr, S,
                                               OFFS, F_SLICED, SPB)
            # A dense F (forward: mixed A, (B, S*R, K) contiguous) stacks the row block's samples as
            # consecutive rows: one block of (J_PAD, BLOCK_K) from row b_first * J, no gather.
            f_blk = tl.make_block_ptr(f_ptr, (NB * J, K), (stride_fr, stride_fk), (b_first * J, 0), (J_PAD, BLOCK_K),
                                      (1, 0))
            for k0 in range(0, K, BLOCK_K):
                if TMA:
                    a = x_desc.load([row0, k0])
                else:
                    a = tl.load(x_blk, boundary_check=(0, 1), padding_option="zero")
                if UPCAST:
                    a = a.to(tl.float32)
                if HAS_BASE:
                    if TMA:
                        w = w_desc.load([col0, k0]).T
                    else:
                        w = tl.load(w_blk, boundary_check=(0, 1), padding_option="zero")
                    if UPCAST:
                        w = w.to(tl.float32)
                    acc = tl.dot(a, w, acc, input_precision=BASE_PRECISION, out_dtype=acc.dtype)
                h_part, f_blk = _shrink_step(a, h_part, f_rows, f_ok, f_off, f_blk, k0, F_WIDTH, stride_fk, op_ty,
                                             F_SLICED, BLOCK_K, LORA_PRECISION)
                x_blk = tl.advance(x_blk, (0, BLOCK_K))
                w_blk = tl.advance(w_blk, (BLOCK_K, 0))
            h_scaled = tl.where(own, h_part, 0.0) * scale
            if STORE_H:
                tl.store(h_ptr + rows64[:, None] * J + (t % J)[None, :], h_scaled,
                         mask=row_ok[:, None] & own & (t < SPB * J)[None, :] & (group == 0))
            h = _expand_operand(h_scaled, EXPAND_TF32, op_ty)  # the shrink's one rounding (contract section 11)
            h_ready = item >= 0
        elif HAS_BASE:
            if live:
                for k0 in range(0, K, BLOCK_K):
                    if TMA:
                        a = x_desc.load([row0, k0])
                        w = w_desc.load([col0, k0]).T
                    else:
                        a = tl.load(x_blk, boundary_check=(0, 1), padding_option="zero")
                        w = tl.load(w_blk, boundary_check=(0, 1), padding_option="zero")
                    if UPCAST:
                        a = a.to(tl.float32)
                        w = w.to(tl.float32)
                    acc = tl.dot(a, w, acc, input_precision=BASE_PRECISION, out_dtype=acc.dtype)
                    x_blk = tl.advance(x_blk, (0, BLOCK_K))
                    w_blk = tl.advance(w_blk, (BLOCK_K, 0))

        if USE_PDL and LORA == 2:
            if adapted:
                # h comes from the shrink launch (which waited for the retrieval): only the expand reads
                # the predecessors' results, so the main loop above ran beside them.
                gdc_wait()
        if adapted:
            if LORA == 1:
                e_rows, e_ok, e_off = _factor_rows(e_ptr, b_first, b_last, t, J, R, stride_eb, stride_es, stride_er, S,
                                                   OFFS, E_SLICED, SPB)
                e = _expand_operand(_factor_tile(e_rows, e_ok, e_off, cols, E_WIDTH, stride_en), EXPAND_TF32, op_ty)
                # A non-finite h (scale * h overflowed, or from the inputs): its terms and marks are left to
                # the second pass, which recomputes h (the unscaled h is not kept: registers).
                acc, h_bad = _expand(acc, h, e, t // J, (t % J) // R, row_sample - b_first, cols, S, OFFS, E_WIDTH,
                                     E_SLICED, SPB, EXPAND_PRECISION, RESCUE)
                rescue = rescue | h_bad
            else:
                for b in tl.range(b_first, b_last + 1, num_stages=1):
                    h_rows = row_ok & (row_sample == b)
                    for j0 in tl.range(0, J, J_STEP, num_stages=1):
                        lane = tl.arange(0, J_CHUNK)
                        tj = j0 + lane % J_STEP
                        hj = tl.load(h_ptr + rows64[:, None] * J + tj[None, :],
                                     mask=h_rows[:, None] & (tj < J)[None, :], other=0.0)
                        e_rows, e_ok, e_off = _factor_rows(e_ptr, b, b, tj, J, R, stride_eb, stride_es, stride_er, S,
                                                           OFFS, E_SLICED, J_CHUNK)
                        ej = _factor_tile(e_rows, e_ok, e_off, cols, E_WIDTH, stride_en)
                        hs = _expand_operand(hj * scale, EXPAND_TF32, op_ty)
                        ej = _expand_operand(ej, EXPAND_TF32, op_ty)
                        # A non-finite scale * h (overflowed, or from the inputs): left to the second pass.
                        if SPLIT:
                            # Lanes [0, J_STEP) carry h_hi, lanes [J_STEP, J_CHUNK) the same columns' h_lo
                            # (a non-finite h makes its lo NaN: left to the second pass either way).
                            first = (lane < J_STEP)
                            h_hi = _tf32_hi(hs)
                            e_hi = _tf32_hi(ej)
                            hs = tl.where(first[None, :], h_hi, hs - h_hi)
                            acc, h_bad = _expand(acc, hs, e_hi, tj * 0, tj // R, tl.where(h_rows, 0, -1), cols, S, OFFS,
                                                 E_WIDTH, E_SLICED, 1, EXPAND_PRECISION, RESCUE)
                            ej = tl.where(first[:, None], ej - e_hi, 0.0)  # h_hi E_lo; h_lo E_lo dropped
                        acc, h_bad = _expand(acc, hs, ej, tj * 0, tj // R, tl.where(h_rows, 0, -1), cols, S, OFFS,
                                             E_WIDTH, E_SLICED, 1, EXPAND_PRECISION, RESCUE)
                        rescue = rescue | h_bad
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        if TMA:  # the tile through the copy engine, clipped at the edges (padding tiles store nothing)
            if live:
                out_desc.store([row0, col0], acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
    if RESCUE:
        if rescue:
            # The second pass, taken only where scale * h (or h) was not finite. The tiles' accumulators
            # are gone (code beside them, in the tile loop, spilled on sm_80 or sm_90), so each adapted tile
            # is read back from out, RESCUE_N columns at a time (a narrow accumulator), the terms its dot
            # left out are added column of h by column (_expand_rescue), and it is stored again: a 16-bit
            # out is rounded twice there (its partial sum, then the total), in these tiles only.
            tl.debug_barrier()  # the tiles' stores, read back by other threads of the program
            if LORA == 1:
                # h again, unscaled (the first pass kept only scale * h: registers), by the same dots.
                own = (row_sample[:, None] - b_first) == (t // J)[None, :]
                h_own = tl.where(own, _fold_shrink(x_ptr, f_ptr, M, K, J, R, NB, F_WIDTH, stride_xm, stride_fb,
                                                   stride_fs, stride_fr, stride_fk, row0, b_first, b_last, t, acc_ty,
                                                   op_ty, S, OFFS, F_SLICED, SPB, J_PAD, BLOCK_M, BLOCK_K, UPCAST,
                                                   LORA_PRECISION), 0.0)
            for i in range(0, TILES):
                live, col0, unused_cols, unused_ok, adapted = _tile_columns(group, i, NOUT, E_WIDTH, S, OFFS, E_SLICED,
                                                                            LORA, IN_PLACE, BLOCK_N, GROUPS, ORDER,
                                                                            TILES)
                if adapted:
                    for c0 in range(0, BLOCK_N, RESCUE_N):
                        cols = col0 + c0 + tl.arange(0, RESCUE_N)
                        col_ok = _columns_written(cols, live, NOUT, E_WIDTH, S, OFFS, E_SLICED, IN_PLACE)
                        out_part = out_ptr + rows64[:, None] * stride_om + cols[None, :]
                        acc = tl.load(out_part, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(acc_ty)
                        if LORA == 1:
                            for tc in range(0, SPB * J):
                                b = b_first + tc // J
                                # The entries the first pass left out: its own operand's, not the recomputed
                                # h's (the same dots, but a term must be added exactly once).
                                lost = tl.sum(tl.where((t == tc)[None, :], h, 0.0), axis=1) * 0.0 != 0.0
                                if tl.sum(tl.where(lost, 1, 0)) > 0:
                                    h_col = tl.sum(tl.where((t == tc)[None, :], h_own, 0.0), axis=1)
                                    acc = _expand_rescue(acc, h_col, lost, e_ptr, b, tc, J, R, stride_eb, stride_es,
                                                         stride_er, stride_en, cols, E_WIDTH, scale, S, OFFS, E_SLICED)
                        else:
                            for b in tl.range(b_first, b_last + 1, num_stages=1):
                                h_rows = row_ok & (row_sample == b)
                                for tc in range(0, J):
                                    h_col = tl.load(h_ptr + rows64 * J + tc, mask=h_rows, other=0.0)
                                    lost = _expand_operand(h_col * scale, EXPAND_TF32, op_ty) * 0.0 != 0.0
                                    acc = _expand_rescue(acc, h_col, lost, e_ptr, b, tc, J, R, stride_eb, stride_es,
                                                         stride_er, stride_en, cols, E_WIDTH, scale, S, OFFS, E_SLICED)
                        tl.store(out_part, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ITEMS and PROGRAMS are read by the persistent launch only: not specialised (no compile per batch size).
@triton.jit(do_not_specialize=["scale_bits", "ITEMS", "PROGRAMS"])
def _mira_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, f_ptr, e_ptr, out_ptr, h_ptr, x_desc, w_desc, out_desc,
    M, NOUT, K, T, J, R, NB, F_WIDTH, E_WIDTH, scale_bits, ITEMS, PROGRAMS,
    stride_xm, stride_wk, stride_wn, stride_bias, stride_om,
    stride_fb, stride_fs, stride_fr, stride_fk, stride_eb, stride_es, stride_er, stride_en,
    S: tl.constexpr, OFFS: tl.constexpr, F_SLICED: tl.constexpr, E_SLICED: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, IN_PLACE: tl.constexpr,
    STORE_H: tl.constexpr, SPB: tl.constexpr, J_PAD: tl.constexpr, J_CHUNK: tl.constexpr,
    J_STEP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
    LEAD_GROUPS: tl.constexpr,
    ORDER: tl.constexpr, TILES: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    EXPAND_PRECISION: tl.constexpr, EXPAND_TF32: tl.constexpr, UPCAST: tl.constexpr, W_ORDER: tl.constexpr,
    USE_PDL: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr, OVERFLOW_PASS: tl.constexpr,
):
    """The projection GEMM with MIRA's adapter fused in: out = x W + bias + scale * (x F_b^T) E_b, one rounding.

    x (M, K) rows of B samples of T tokens; W (K, NOUT) (W_ORDER: its fastest dimension first); the
    per-sample factors F (shrink, (J = S*R) x K) and E (expand, J x NOUT) are read through four
    strides (sample, slice, rank, position); a SLICED factor covers only the S slices of its long
    axis, at OFFS, F_WIDTH / E_WIDTH wide (zero elsewhere). A dense F must be (NB samples, J, K)
    contiguous in its sample and rank axes (it is read as NB * J rows of K). Forward: F = mixed A (dense over d_in),
    E = mixed B (sliced over d_out). Backward dx: x = G, W = weight, F = mixed B (sliced over d_out),
    E = mixed A (dense over d_in), and STORE_H keeps h = scale * G F^T (dh) for dA.

    LORA = 0: no adapter. LORA = 1 (small adapters, SPB * J <= 64): the shrink is folded into the
    main loop of the first adapted tile a program computes (the x tile is already loaded): h for the
    row block's SPB samples at once, as one dot against the stacked factors; rows keep their own
    sample's columns. LORA = 2: h was computed by ``_mira_shrink_fwd_kernel`` (with USE_PDL the GEMM waits
    for it after a tile's main loop, before the expand) and is read from h_ptr
    (M, J) in fp32; the expand loops over the samples of the tile, J_STEP columns of h at a time
    (J_CHUNK = J_STEP unless SPLIT). SPLIT (fp16 x: 3xTF32 accuracy, contract section 11) splits h
    and E into TF32-exact hi and fp32 lo halves and adds h_hi E_hi + h_lo E_hi + h_hi E_lo, the
    three products of a 3xTF32 dot, as two TF32 dots of J_CHUNK = 2 J_STEP columns: [h_hi | h_lo]
    against [E_hi; E_hi], then [h_hi | 0] against [E_lo; 0]. Triton's tf32x3 takes three dots and
    spilled in this kernel; the columns J_STEP pads a small J (8 for ViT's S*r) to are used here.

    scale multiplies h before the expand; the reference applies it last, to h E. Where scale * h is
    not finite (scale = 1e30, |h| ~ 1e10 in fp32, where the reference's 1e30 (h E) may be finite; or
    h itself from the inputs), the dot leaves those entries out, unmarked, and a second pass over the
    work item's stored tiles, taken only then (flagged by the expand's own non-finite count), adds
    scale (h e) for them, one column of h at a time (``_expand_rescue``: finite where only the scale
    overflowed, the marks where h is not finite). LORA = 1 recomputes the unscaled h by the main loop's
    dots (``_fold_shrink``), LORA = 2 reads it from h_ptr. Not with TMA (its stores are asynchronous):
    NaN there, as before.

    Grid: (cdiv(M, BLOCK_M) * GROUPS,): program (row block, group g) computes the column tiles
    ORDER[g], ORDER[g + GROUPS], ... (ORDER lists the tiles without an adapter first, so a program
    waits for the retrieval (USE_PDL: gdc_wait) only after them, and computes h once per row block
    for all its adapted tiles). Programs are numbered row block by row block, except that the items of
    the first LEAD_GROUPS groups (0 < LEAD_GROUPS < GROUPS: the groups whose first tile has no
    adapter) come first for every row block: the first waves then wait for nothing, and on Hopper
    the retrieval runs beside them. HAS_BASE = False (in-place adapter): the main loop only shrinks and
    the accumulator starts from out (IN_PLACE). UPCAST (bf16 under the interpreter only, whose bf16
    dot is wrong) runs the dots in fp32.

    TMA (an opt-in of :func:`.configs.overriding`, for measuring on Hopper): the main loop's x and W
    tiles come through the tensor descriptors x_desc ((M, K), [BLOCK_M, BLOCK_K] boxes) and w_desc
    (the weight as (NOUT, K), [BLOCK_N, BLOCK_K] boxes) instead of block pointers, the copy engine
    zero-filling what lies outside, as the boundary checks do: the same values, the same dots; and
    the output tile leaves through out_desc ((M, NOUT), [BLOCK_M, BLOCK_N] boxes), clipped at the
    edges as the masked store is. Else the three are x's, W's and out's pointers again, unused.

    PERSISTENT (an opt-in of :func:`.configs.overriding`): PROGRAMS programs walk the ITEMS work items
    (row block, group), each computed whole by one program as in the one-item launch, so the bits are
    the same; otherwise the grid has one program per item.
    """
    if PERSISTENT:
        for item in range(tl.program_id(0), ITEMS, PROGRAMS):
            _gemm_work_item(
                item,
                x_ptr, w_ptr, bias_ptr, f_ptr, e_ptr, out_ptr, h_ptr, x_desc, w_desc, out_desc, M, NOUT, K, T, J, R, NB,
                F_WIDTH, E_WIDTH, scale_bits, stride_xm, stride_wk, stride_wn, stride_bias, stride_om, stride_fb,
                stride_fs, stride_fr, stride_fk, stride_eb, stride_es, stride_er, stride_en, S, OFFS, F_SLICED,
                E_SLICED, HAS_BASE, HAS_BIAS, LORA, IN_PLACE, STORE_H, SPB, J_PAD, J_CHUNK, J_STEP, SPLIT, BLOCK_M,
                BLOCK_N, BLOCK_K, GROUPS, LEAD_GROUPS, ORDER, TILES, BASE_PRECISION, LORA_PRECISION, EXPAND_PRECISION,
                EXPAND_TF32, UPCAST, W_ORDER, USE_PDL, TMA, OVERFLOW_PASS)
    else:
        _gemm_work_item(
            tl.program_id(0),
            x_ptr, w_ptr, bias_ptr, f_ptr, e_ptr, out_ptr, h_ptr, x_desc, w_desc, out_desc, M, NOUT, K, T, J, R, NB,
            F_WIDTH, E_WIDTH, scale_bits, stride_xm, stride_wk, stride_wn, stride_bias, stride_om,
            stride_fb, stride_fs, stride_fr, stride_fk, stride_eb, stride_es, stride_er, stride_en, S, OFFS, F_SLICED,
            E_SLICED, HAS_BASE, HAS_BIAS, LORA, IN_PLACE, STORE_H, SPB, J_PAD, J_CHUNK, J_STEP, SPLIT, BLOCK_M,
            BLOCK_N, BLOCK_K, GROUPS, LEAD_GROUPS, ORDER, TILES, BASE_PRECISION, LORA_PRECISION, EXPAND_PRECISION,
            EXPAND_TF32, UPCAST, W_ORDER, USE_PDL, TMA, OVERFLOW_PASS)


@triton.jit
def _mira_shrink_fwd_kernel(
    in_ptr, f_ptr, out_ptr,
    M, T, K, J,
    stride_im, stride_fb, stride_fs, stride_fj, stride_fk,
    NUM_SLICES: tl.constexpr, IN_OFFS: tl.constexpr, J_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LORA_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """out[m, s*J + j] = sum_k in[m, IN_OFFS[s] + k] * F[b(m), s, j, k], with b(m) = m // T.

    Forward shrink: in = x (M, d_in), F = mixed A viewed (B, 1, S*r, d_in), one slice.
    Backward dh (unscaled): in = G (M, d_out), F[b, s, j, k] = mixed B[b, s, k, j], S slices.
    out (M, NUM_SLICES*J) in ct. Grid: (cdiv(M, BLOCK_M), NUM_SLICES).

    USE_PDL (the forward on Hopper): launched while the retrieval runs, it lets the GEMM launch at once
    (whose main loop needs neither) and waits for the retrieval's mixed factors before reading them.
    NATIVE (in and F both bf16, compiled): one dot on the operands as loaded, whose products are exact
    in the fp32 accumulator, as the GEMM's folded shrink computes them; else operands in ct and
    LORA_PRECISION.
    """
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    ct = out_ptr.dtype.element_ty
    off = _pick(pid_s, IN_OFFS, NUM_SLICES)

    row0 = pid_m * BLOCK_M
    rows, rows64, row_ok, row_sample, b_first, b_last = _row_block(row0, M, T, BLOCK_M)
    js = tl.arange(0, J_PAD)
    j_ok = js < J

    acc = tl.zeros((BLOCK_M, J_PAD), dtype=ct)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(in_ptr + rows64[:, None] * stride_im + (off + ks)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if not NATIVE:
            a = a.to(ct)
        for b in tl.range(b_first, b_last + 1, num_stages=1):
            # The sample's offset in 64 bits: b * stride_fb passes 2^31 once the B samples' factors do
            # (B = 8192, S = 2, r = 256, d_in = 1024), and Triton types b and the strides as i32 (tl.cast: the
            # interpreter's tl.range yields Python ints). Within the sample, S r d_in elements: 32 bits (wider
            # tiles of offsets spilled), widened where they join it (one offset, one address).
            f = tl.load(f_ptr + (tl.cast(b, tl.int64) * stride_fb
                                 + (pid_s * stride_fs + ks[:, None] * stride_fk + js[None, :] * stride_fj)),
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            if NATIVE:
                part = tl.dot(a, f, out_dtype=ct)
            else:
                part = tl.dot(a, f.to(ct), input_precision=LORA_PRECISION, out_dtype=ct)
            acc += tl.where((row_sample == b)[:, None], part, 0.0)
    out_cols = pid_s * J + js
    tl.store(out_ptr + rows64[:, None] * (NUM_SLICES * J) + out_cols[None, :], acc,
             mask=row_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["alpha_bits"])
def _mira_factor_bwd_kernel(
    l_ptr, r_ptr, out_ptr,
    T, FD, J, alpha_bits,
    stride_lm, stride_rm, stride_ob, stride_os, stride_of, stride_oj,
    NUM_SLICES: tl.constexpr, L_OFFS: tl.constexpr, J_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """Per-sample reduction over T: out[b, s, f, j] = alpha * sum_t L[bT+t, L_OFFS[s]+f] R[bT+t, s*J+j].

    dB_b: L = G, slices at the layer's offsets, FD = d_s, R = h, alpha = scale.
    dA_b: L = x, one slice of J = S*r columns, FD = d_in, R = dh, alpha = 1.
    One program owns (sample, slice, column chunk) and walks T in order: no atomics,
    bitwise-reproducible. Grid: (B, NUM_SLICES, cdiv(FD, BLOCK_F)).
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_f = tl.program_id(2)
    ct = out_ptr.dtype.element_ty
    alpha = _f64(alpha_bits).to(ct)
    off = _pick(pid_s, L_OFFS, NUM_SLICES)

    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < FD
    js = tl.arange(0, J_PAD)
    j_ok = js < J
    acc = tl.zeros((BLOCK_F, J_PAD), dtype=ct)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < T
        m = pid_b.to(tl.int64) * T + ts  # row index: 64-bit before it meets a row stride
        lt = tl.load(l_ptr + m[:, None] * stride_lm + (off + fs)[None, :],
                     mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        rt = tl.load(r_ptr + m[:, None] * stride_rm + (pid_s * J + js)[None, :],
                     mask=t_ok[:, None] & j_ok[None, :], other=0.0).to(ct)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=LORA_PRECISION, out_dtype=acc.dtype)
    # 64-bit offset: the B samples' dA_b / dB_b pass 2^31 elements as the mixed factors do (a 32-bit
    # pid_b * stride_ob wrapped: a store out of bounds).
    out_off = (pid_b.to(tl.int64) * stride_ob + pid_s.to(tl.int64) * stride_os + fs.to(tl.int64)[:, None] * stride_of
               + js.to(tl.int64)[None, :] * stride_oj)
    tl.store(out_ptr + out_off, alpha * acc, mask=f_ok[:, None] & j_ok[None, :])


@triton.jit
def _normalize_grad(u, u_norm, g, g_dot_unit):
    # d/du of u / max(|u|, eps) applied to g, with (u/|u|).g precomputed over the full width. The floor
    # in u's dtype: Triton types the bare constant fp32 (9.99999996e-13), which in float64 moved the
    # branch below the reference's 1e-12.
    floor = tl.full((), NORM_EPS, u_norm.dtype)
    den = tl.maximum(u_norm, floor)
    tangent = (g - (u / den) * g_dot_unit) / den
    # The tangent from |u| = eps on (and for NaN), as the reference's ~(norm < eps).
    return tl.where(u_norm < floor, g / floor, tangent)


@triton.jit
def _mira_dw_bwd_kernel(
    dmixed_a_ptr, dmixed_b_ptr, bank_a_ptr, bank_b_ptr, partial_ptr,
    B, N, FA, FB,
    NC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """First pass of dw[b, n] = <dA_b, bank_a[n]> + <dB_b, bank_b[n]>: one partial per column share.

    dmixed (B, FA), (B, FB) ct; banks flattened (N, FA), (N, FB); partial (SPLIT, B, N) ct.
    Grid: (cdiv(B, BLOCK_B), SPLIT, cdiv(N, NC)); program (i, j, c) reduces column chunks j,
    j+SPLIT, ... in order for slots [c NC, c NC + NC). The second pass (``_mira_scores_bwd_kernel``)
    adds the SPLIT partials in order: a deterministic two-pass reduction that reads the banks with
    the whole device.
    """
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_split = tl.num_programs(1)
    ct = partial_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    slots = pid_c * NC + tl.arange(0, NC)
    slot_ok = slots < N
    slots64 = slots.to(tl.int64)

    dw = tl.zeros((BLOCK_B, NC), dtype=ct)
    for f0 in range(pid_f * BLOCK_F, FA, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FA
        d = tl.load(dmixed_a_ptr + rows64[:, None] * FA + fcols[None, :], mask=row_ok[:, None] & f_ok[None, :],
                    other=0.0)
        bank = tl.load(bank_a_ptr + slots64[:, None] * FA + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        dw = tl.dot(d, tl.trans(bank), dw, input_precision=LORA_PRECISION, out_dtype=dw.dtype)
    for f0 in range(pid_f * BLOCK_F, FB, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FB
        d = tl.load(dmixed_b_ptr + rows64[:, None] * FB + fcols[None, :], mask=row_ok[:, None] & f_ok[None, :],
                    other=0.0)
        bank = tl.load(bank_b_ptr + slots64[:, None] * FB + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        dw = tl.dot(d, tl.trans(bank), dw, input_precision=LORA_PRECISION, out_dtype=dw.dtype)
    tl.store(partial_ptr + (pid_f * B + rows64[:, None]) * N + slots[None, :], dw,
             mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _dw_chunk(partial_ptr, rows64, slots, valid, B, N, n_partials, BLOCK_B: tl.constexpr, NC: tl.constexpr, ct):
    # dw for one chunk of slots: the partials summed in their fixed order.
    dw = tl.zeros((BLOCK_B, NC), dtype=ct)
    for i in range(0, n_partials):
        dw += tl.load(partial_ptr + (i * B + rows64[:, None]) * N + slots[None, :], mask=valid, other=0.0)
    return dw


@triton.jit(do_not_specialize=["eps_bits"])
def _mira_scores_bwd_kernel(
    partial_ptr, scores_ptr, weights_ptr, qnorm_ptr, knorm_ptr, denom_ptr, branch_ptr, q_ptr, k_ptr, dz_ptr, dq_ptr,
    B, N, DK, n_partials, eps_bits,
    stride_qb, stride_qk, stride_kn, stride_kk,
    SEPARATION: tl.constexpr, NEED_Q: tl.constexpr, NC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SCORE_PRECISION: tl.constexpr, WIDE_SCORES: tl.constexpr,
):
    """dw (sum of the partials, in order), dz = sep'(dw), and a column chunk of dquery.

    partial (n_partials, B, N), scores/weights (B, N), norms (B,), (N,) from the forward
    recompute; writes dz (B, N) ct (program column 0 only) and dq (B, DK) in query's dtype.
    Slots are taken NC at a time (any N): a first pass sums the row terms the separation's
    backward needs (sum_n dw w), a second forms dz and accumulates dquery's pieces.
    dquery = normalize'(q) (dz @ unit(K)); its projection term (q/|q|).g equals
    sum_n dz[b, n] s[b, n] (s is the cosine), so every d_k chunk is independent.
    Affine: the guarded denominator (B,) is the one the retrieval divided by (``denom``, fp64 when
    WIDE_SCORES), and whether the gradient flows through the sum is the forward's branch: ``branch``
    holds the forward's own affine sum (B,), compared with eps in its dtype as the forward compared
    it; a sum recomputed here (or in the backward's fp64 retrieval) can fall on the other side of eps.
    Grid: (cdiv(B, BLOCK_B), cdiv(DK, BLOCK_K)).
    """
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    ct = dz_ptr.dtype.element_ty
    floor = tl.full((), NORM_EPS, ct)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, NC)

    # Row sums accumulate elementwise over the chunks and are reduced once (a reduction inside the
    # loop trips Triton 3.8's thread-locality pass).
    dww_acc = tl.zeros((BLOCK_B, NC), dtype=ct)
    for c0 in range(0, N, NC):
        slots = c0 + lanes
        valid = row_ok[:, None] & (slots < N)[None, :]
        bn = rows64[:, None] * N + slots[None, :]
        dw = _dw_chunk(partial_ptr, rows64, slots, valid, B, N, n_partials, BLOCK_B, NC, ct)
        w = tl.load(weights_ptr + bn, mask=valid, other=0.0)
        dww_acc += dw * w
    dw_w = tl.sum(dww_acc, axis=1)
    if SEPARATION == AFFINE:
        denom = tl.load(denom_ptr + rows, mask=row_ok, other=1.0)
        fwd_total = tl.load(branch_ptr + rows, mask=row_ok, other=0.0)
        # Inside the clamp the denominator is a constant: no gradient through the sum.
        through_sum = tl.where(tl.abs(fwd_total) >= _f64(eps_bits).to(branch_ptr.dtype.element_ty), dw_w, 0.0)

    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < DK
    g = tl.zeros((BLOCK_B, BLOCK_K), dtype=ct)
    dzs_acc = tl.zeros((BLOCK_B, NC), dtype=ct)
    for c0 in range(0, N, NC):
        slots = c0 + lanes
        slot_ok = slots < N
        valid = row_ok[:, None] & slot_ok[None, :]
        bn = rows64[:, None] * N + slots[None, :]
        dw = _dw_chunk(partial_ptr, rows64, slots, valid, B, N, n_partials, BLOCK_B, NC, ct)
        s = tl.load(scores_ptr + bn, mask=valid, other=0.0)
        w = tl.load(weights_ptr + bn, mask=valid, other=0.0)
        if SEPARATION == AFFINE:
            dz = tl.where(N == 1, dw, (dw - through_sum[:, None]) / denom[:, None])
        elif SEPARATION == SOFTMAX:
            dz = w * (dw - dw_w[:, None])
        elif SEPARATION == RELU:
            dz = tl.where(s <= 0, 0.0, dw)  # as autograd of torch.relu: a NaN score passes its gradient
        elif SEPARATION == TANH:
            dz = dw * (1.0 - w * w)
        elif SEPARATION == SIGMOID:
            dz = dw * w * (1.0 - w)
        else:
            dz = dw
        dz = tl.where(valid, dz, 0.0).to(ct)
        tl.store(dz_ptr + bn, dz, mask=valid & (pid_k == 0))
        if NEED_Q:
            k_norm = tl.load(knorm_ptr + slots, mask=slot_ok, other=1.0)
            dzs_acc += dz * s
            kt = tl.load(k_ptr + slots.to(tl.int64)[:, None] * stride_kn + cols[None, :] * stride_kk,
                         mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
            g = tl.dot(dz / tl.maximum(k_norm, floor)[None, :], kt, g, input_precision=SCORE_PRECISION,
                       out_dtype=g.dtype)

    if NEED_Q:
        g_dot_unit = tl.sum(dzs_acc, axis=1)
        q_norm = tl.load(qnorm_ptr + rows, mask=row_ok, other=0.0)
        qt = tl.load(q_ptr + rows64[:, None] * stride_qb + cols[None, :] * stride_qk,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        dq = _normalize_grad(qt, q_norm[:, None], g, g_dot_unit[:, None])
        tl.store(dq_ptr + rows64[:, None] * DK + cols[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mira_keys_bwd_kernel(
    dz_ptr, scores_ptr, q_ptr, k_ptr, qnorm_ptr, knorm_ptr, dk_ptr,
    B, N, DK,
    stride_qb, stride_qk, stride_kn, stride_kk,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SCORE_PRECISION: tl.constexpr,
):
    """dkeys[n] = normalize'(k_n) (sum_b dz[b, n] q_b / |q_b|), summed over b in a fixed order.

    dz, scores (B, N) ct, norms from the forward recompute, dk (N, DK) in keys' dtype. The
    projection term (k/|k|).g is sum_b dz[b, n] s[b, n], so d_k chunks are independent.
    Grid: (cdiv(N, BLOCK_N), cdiv(DK, BLOCK_K)).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ct = dz_ptr.dtype.element_ty
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < N
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < DK
    k_norm = tl.load(knorm_ptr + slots, mask=slot_ok, other=0.0)

    g_dot_unit = tl.zeros((BLOCK_N,), dtype=ct)
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=ct)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_ok = bs < B
        m = b_ok[:, None] & slot_ok[None, :]
        dzt = tl.load(dz_ptr + bs[:, None] * N + slots[None, :], mask=m, other=0.0)
        st = tl.load(scores_ptr + bs[:, None] * N + slots[None, :], mask=m, other=0.0)
        g_dot_unit += tl.sum(dzt * st, axis=0)
        q_norm = tl.load(qnorm_ptr + bs, mask=b_ok, other=1.0)
        # 64-bit before the row stride: the layers' query is x[:, 0], a view whose row stride is T * d_in,
        # so (B - 1) * stride_qb passes 2^31 with a large x (Triton types ints as i32).
        qt = tl.load(q_ptr + bs.to(tl.int64)[:, None] * stride_qb + cols[None, :] * stride_qk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        qt = qt / tl.maximum(q_norm, tl.full((), NORM_EPS, q_norm.dtype))[:, None]  # the floor in ct, not fp32
        g = tl.dot(tl.trans(dzt), qt, g, input_precision=SCORE_PRECISION, out_dtype=g.dtype)
    kt = tl.load(k_ptr + slots.to(tl.int64)[:, None] * stride_kn + cols[None, :] * stride_kk,
                 mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
    dk = _normalize_grad(kt, k_norm[:, None], g, g_dot_unit[:, None])
    tl.store(dk_ptr + slots[:, None] * DK + cols[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def _mira_bank_bwd_kernel(
    w_ptr, d_ptr, out_ptr,
    B, N, F,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """dbank[n, f] = sum_b w[b, n] dmixed[b, f], b in a fixed order.

    w (B, N) ct, dmixed (B, F) ct, dbank (N, F) in the bank's dtype (F = FA or FB, flattened).
    Grid: (cdiv(N, BLOCK_N), SPLIT); program (i, j) owns column chunks j, j+SPLIT, ...
    """
    pid_n = tl.program_id(0)
    pid_f = tl.program_id(1)
    n_split = tl.num_programs(1)
    ct = w_ptr.dtype.element_ty
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < N
    for f0 in range(pid_f * BLOCK_F, F, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < F
        acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=ct)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            b_ok = bs < B
            wt = tl.load(w_ptr + bs[:, None] * N + slots[None, :], mask=b_ok[:, None] & slot_ok[None, :], other=0.0)
            # Rows of dmixed (B, F) 64-bit before the row width: B * F passes 2^31 with the mixed factors.
            dt = tl.load(d_ptr + bs.to(tl.int64)[:, None] * F + fcols[None, :], mask=b_ok[:, None] & f_ok[None, :],
                         other=0.0)
            acc = tl.dot(tl.trans(wt), dt, acc, input_precision=LORA_PRECISION, out_dtype=acc.dtype)
        tl.store(out_ptr + slots.to(tl.int64)[:, None] * F + fcols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=slot_ok[:, None] & f_ok[None, :])


@triton.jit
def _key_rows(k_ptr, n0, N, cols64, col_ok, stride_kn, stride_kd, BLOCK_N: tl.constexpr):
    """Rows [n0, n0 + BLOCK_N) of the column block, in fp64 (0 outside): (values, in-bounds mask, rows64)."""
    rows64 = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = (rows64 < N)[:, None] & col_ok[None, :]
    k = tl.load(k_ptr + rows64[:, None] * stride_kn + cols64[None, :] * stride_kd, mask=ok, other=0.0)
    return k.to(tl.float64), ok, rows64


@triton.jit(do_not_specialize=["eps_bits"])
def _normalize_columns_kernel(k_ptr, out_ptr, N, D, stride_kn, stride_kd, eps_bits,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[:, j] = k[:, j] / max(||k[:, j]||, eps): each column (feature) to unit L2 norm across the N
    rows (the layers' per-feature key normalisation, ``F.normalize(keys, dim=0)``), in one launch.

    In fp64 whatever k's dtype, rounded once to out's: the norm is m ||k / m|| with m the column's
    largest |k| (1 for a zero or non-finite column), so no column's squares overflow or underflow.
    Non-finite entries propagate as in ``F.normalize``: an inf entry makes its column's norm inf
    (finite entries 0, the inf one NaN), a NaN entry makes its column NaN. Three passes over the
    column block (max, squares, divide); the keys are a few KB, read from L2 after the first.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)
    eps = _f64(eps_bits)
    top = tl.zeros((BLOCK_D,), dtype=tl.float64)
    nan = tl.zeros((BLOCK_D,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        k, ok, rows64 = _key_rows(k_ptr, n0, N, cols64, col_ok, stride_kn, stride_kd, BLOCK_N)
        top = tl.maximum(top, tl.max(tl.abs(k), axis=0))
        nan = tl.maximum(nan, tl.max((k != k).to(tl.int32), axis=0))
    scale = tl.where((nan == 0) & (top > 0) & (top < float("inf")), top, 1.0)
    squares = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for n0 in range(0, N, BLOCK_N):
        k, ok, rows64 = _key_rows(k_ptr, n0, N, cols64, col_ok, stride_kn, stride_kd, BLOCK_N)
        v = k / scale[None, :]
        squares += tl.sum(v * v, axis=0)
    norm = scale * tl.sqrt(squares)
    denom = tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)  # a NaN norm stays NaN (as clamp_min)
    for n0 in range(0, N, BLOCK_N):
        k, ok, rows64 = _key_rows(k_ptr, n0, N, cols64, col_ok, stride_kn, stride_kd, BLOCK_N)
        tl.store(out_ptr + rows64[:, None] * D + cols64[None, :], (k / denom[None, :]).to(out_ptr.dtype.element_ty),
                 mask=ok)
