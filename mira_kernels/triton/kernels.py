"""Triton kernels of the MIRA ops (NVIDIA GPUs; numerics checked with the Triton interpreter).

Notation (docs of :mod:`mira_kernels.reference`): B samples, T tokens, M = B*T rows, N slots,
S slices, r rank, d_in / d_out / d_s / d_k widths. ``ct`` is the compute dtype: float32 for
16-bit x, else x's dtype. Every kernel reads its ct from an output or workspace pointer.

Design (forward, three launches, no atomics, grids from shapes only):

1. ``_mira_mix_fwd_kernel``: scores + separation + mixing. One program owns a tile of 16
   samples and a strided share of the flattened factor columns; it computes that tile's
   (16, N) cosine scores with ``tl.dot``, separates them in registers, and mixes the banks with
   a second ``tl.dot`` (weights (16, N) @ bank (N, F)). Mixing per sample tile reads the banks
   once per 16 samples; fusing it into the token-row kernels would re-read them once per
   64-row tile (about 3x per sample at T=197).
2. ``_mira_shrink_fwd_kernel``: h = x A_b^T over row tiles of the flattened (M, d_in) input.
   Tiles ignore sample boundaries; each row knows its sample (row // T) and a tile loops over
   the (usually one or two) samples it touches, masking rows. T=197 thus wastes no tiles.
3. ``_mira_linear_fwd_kernel``: the base GEMM x W^T with the LoRA expand fused into the same
   accumulator (LoRAFusion style), the bias, and one rounding to x's dtype. The expand only
   runs on output tiles that intersect an adapted slice, with K = r padded to 16 by masks.

Why the shrink is its own kernel (LoRAFusion does the same): the expand of an output tile
needs h = x A_b^T over the whole d_in, i.e. before the tile's K loop ends. Computing h inside
every GEMM tile would redo an (M, d_in) x (d_in, 16) product per adapted output tile (+12.5%
tensor-core work at 128-wide tiles, 25% in TF32); the separate kernel re-reads x once instead
(memory-bound, ~13% of the qkv GEMM at the H100 roofline when x comes from DRAM, less when it
is still in L2). ``benchmarks/triton_model.py`` prices both parts.

Backward reuses 2 (dh = G_s B_b, unscaled) and 3 (dx = G W + scale sum_s dh_s A_b) with other
strides, and adds: per-sample reductions over T in a fixed order (``_mira_factor_bwd_kernel``
for dA_b and dB_b); dw = <dA_b, bank_a> + <dB_b, bank_b> as a two-pass reduction
(``_mira_dw_bwd_kernel`` partials per bank column share, summed in order by
``_mira_scores_bwd_kernel``, which also applies the separation and cosine backward and writes
dquery); ``_mira_keys_bwd_kernel`` (dkeys, a reduction over B in a fixed order) and
``_mira_bank_bwd_kernel`` (dbank = w^T dF). No atomics anywhere: bitwise reproducible.

Precision: base products of 16-bit x run on tensor cores with fp32 accumulation. The adapter
path is fp32 as the spec says. With 16-bit x (or fp32 x with
``torch.backends.cuda.matmul.allow_tf32``) its products use tensor cores: "tf32x3" (three TF32
products, about fp32 accuracy) in the memory-bound kernels (mixing, shrink, reductions,
in-place expand) and for the cosines, and one "tf32" product only for the expand inside the
compute-bound GEMM (x and G are exact in TF32; h and B_b are rounded to 10 mantissa bits, below
fp16's final rounding of the sum). Otherwise (fp32 x by default, fp64) every dot is "ieee".
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def _select_offset(pid_s, OFFS: tl.constexpr, S: tl.constexpr):
    # The slice offsets are compile-time constants (static per layer); pick the one of a
    # program's slice without a device-side table.
    off = pid_s * 0
    for i in tl.static_range(S):
        off = tl.where(pid_s == i, OFFS[i], off)
    return off


@triton.jit(do_not_specialize=["eps_bits"])
def _mira_mix_fwd_kernel(
    q_ptr, k_ptr, bank_a_ptr, bank_b_ptr, mixed_a_ptr, mixed_b_ptr,
    scores_ptr, weights_ptr, qnorm_ptr, knorm_ptr,
    B, N, DK, FA, FB, eps_bits,
    stride_qb, stride_qk, stride_kn, stride_kk,
    SEPARATION: tl.constexpr, SAVE_STATS: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, SCORE_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
):
    """Scores, separation and mixing for a tile of BLOCK_B samples.

    Shapes: q (B, DK), keys (N, DK), banks flattened (N, FA) and (N, FB) with FA = S*r*d_in and
    FB = S*d_s*r, mixed outputs (B, FA), (B, FB) in ct. With SAVE_STATS the raw scores and the
    weights (B, N) and the norms of q (B,) and keys (N,) are stored for the backward.
    Grid: (cdiv(B, BLOCK_B), SPLIT); program (i, j) mixes column chunks j, j+SPLIT, ...
    """
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    n_split = tl.num_programs(1)
    ct = mixed_a_ptr.dtype.element_ty
    eps = _f64(eps_bits).to(ct)

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    slots = tl.arange(0, N_PAD)
    slot_ok = slots < N
    valid = row_ok[:, None] & slot_ok[None, :]

    dots = tl.zeros((BLOCK_B, N_PAD), dtype=ct)
    q_sq = tl.zeros((BLOCK_B,), dtype=ct)
    k_sq = tl.zeros((N_PAD,), dtype=ct)
    for k0 in range(0, DK, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < DK
        qt = tl.load(q_ptr + rows[:, None] * stride_qb + cols[None, :] * stride_qk,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        kt = tl.load(k_ptr + slots[:, None] * stride_kn + cols[None, :] * stride_kk,
                     mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        dots = tl.dot(qt, tl.trans(kt), dots, input_precision=SCORE_PRECISION)
        q_sq += tl.sum(qt * qt, axis=1)
        k_sq += tl.sum(kt * kt, axis=1)
    q_norm = tl.sqrt(q_sq)
    k_norm = tl.sqrt(k_sq)
    scores = dots / tl.maximum(q_norm, NORM_EPS)[:, None] / tl.maximum(k_norm, NORM_EPS)[None, :]
    scores = tl.where(valid, scores, 0.0)

    if SEPARATION == AFFINE:
        # Sign-preserving clamp of the denominator (sign(0) = +); N = 1 keeps the raw cosine.
        total = tl.sum(scores, axis=1)
        denom = tl.where(tl.abs(total) >= eps, total, tl.where(total >= 0, eps, -eps))
        weights = tl.where(N == 1, scores, scores / denom[:, None])
    elif SEPARATION == SOFTMAX:
        logits = tl.where(valid, scores, float("-inf"))
        top = tl.max(logits, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)  # N = 0 or a padding row
        e = tl.where(valid, tl.exp(logits - top[:, None]), 0.0)
        total = tl.sum(e, axis=1)
        weights = e / tl.where(total > 0, total, 1.0)[:, None]
    elif SEPARATION == RELU:
        weights = tl.maximum(scores, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch
    elif SEPARATION == TANH:
        weights = _tanh(scores)
    elif SEPARATION == SIGMOID:
        weights = tl.sigmoid(scores)
    else:
        weights = scores
    weights = tl.where(valid, weights, 0.0).to(ct)

    if SAVE_STATS:
        first = pid_f == 0
        out_bn = rows[:, None] * N + slots[None, :]
        tl.store(scores_ptr + out_bn, scores, mask=valid & first)
        tl.store(weights_ptr + out_bn, weights, mask=valid & first)
        tl.store(qnorm_ptr + rows, q_norm, mask=row_ok & first)
        tl.store(knorm_ptr + slots, k_norm, mask=slot_ok & first & (pid_b == 0))

    # Mixing: (BLOCK_B, N_PAD) @ (N_PAD, BLOCK_F) per chunk; padded slots carry weight 0.
    for f0 in range(pid_f * BLOCK_F, FA, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FA
        bank = tl.load(bank_a_ptr + slots[:, None] * FA + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        mixed = tl.dot(weights, bank, input_precision=LORA_PRECISION)
        tl.store(mixed_a_ptr + rows[:, None] * FA + fcols[None, :], mixed, mask=row_ok[:, None] & f_ok[None, :])
    for f0 in range(pid_f * BLOCK_F, FB, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FB
        bank = tl.load(bank_b_ptr + slots[:, None] * FB + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        mixed = tl.dot(weights, bank, input_precision=LORA_PRECISION)
        tl.store(mixed_b_ptr + rows[:, None] * FB + fcols[None, :], mixed, mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _mira_shrink_fwd_kernel(
    in_ptr, f_ptr, out_ptr,
    M, T, K, J,
    stride_im, stride_fb, stride_fs, stride_fj, stride_fk,
    NUM_SLICES: tl.constexpr, IN_OFFS: tl.constexpr, J_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """out[m, s*J + j] = sum_k in[m, IN_OFFS[s] + k] * F[b(m), s, j, k], with b(m) = m // T.

    Forward shrink: in = x (M, d_in), F = mixed A viewed (B, 1, S*r, d_in), one slice.
    Backward dh (unscaled): in = G (M, d_out), F[b, s, j, k] = mixed B[b, s, k, j], S slices.
    out (M, NUM_SLICES*J) in ct. Grid: (cdiv(M, BLOCK_M), NUM_SLICES).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    ct = out_ptr.dtype.element_ty
    off = _select_offset(pid_s, IN_OFFS, NUM_SLICES)

    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # row offsets times a row stride can pass 2^31 (Triton types ints as i32)
    row_ok = rows < M
    row_sample = rows // T
    b_first = row0 // T
    b_last = (tl.minimum(row0 + BLOCK_M, M) - 1) // T
    js = tl.arange(0, J_PAD)
    j_ok = js < J

    acc = tl.zeros((BLOCK_M, J_PAD), dtype=ct)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(in_ptr + rows64[:, None] * stride_im + (off + ks)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(ct)
        for b in tl.range(b_first, b_last + 1, num_stages=1):
            f = tl.load(f_ptr + b * stride_fb + pid_s * stride_fs + ks[:, None] * stride_fk + js[None, :] * stride_fj,
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0).to(ct)
            part = tl.dot(a, f, input_precision=LORA_PRECISION)
            acc += tl.where((row_sample == b)[:, None], part, 0.0)
    out_cols = pid_s * J + js
    tl.store(out_ptr + rows64[:, None] * (NUM_SLICES * J) + out_cols[None, :], acc,
             mask=row_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["scale_bits"])
def _mira_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, e_ptr, out_ptr,
    M, NOUT, K, T, J, SLICE_W, scale_bits,
    stride_xm, stride_wk, stride_wn, stride_eb, stride_es, stride_ej, stride_en, stride_om, stride_bias,
    S: tl.constexpr, OFFS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    J_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST: tl.constexpr, W_ORDER: tl.constexpr,
):
    """out = x @ W + bias + scale * sum_s [n in slice s] h[:, s] @ E[b(m), s], rounded once.

    Forward: x (M, d_in), W[k, n] = weight[n, k], h (M, S*r) ct, E[b, s, j, n] = mixed B[b, s, n, j],
    slices at OFFS of width SLICE_W = d_s. Backward dx: x = G (M, d_out), W = weight, h = dh,
    E = mixed A (B, S, r, d_in), every slice at 0 of width d_in (their sum), scale 1, no bias.
    Grid: (cdiv(M, BLOCK_M) * cdiv(NOUT, BLOCK_N),), grouped along M for L2 reuse of W.
    UPCAST (bf16 under the interpreter only, whose bf16 dot is wrong) runs the base dot in fp32.
    W_ORDER is W's fastest-varying dimension first: (0, 1) for weight^T (forward), (1, 0) for dx.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    acc_ty = h_ptr.dtype.element_ty
    scale = _f64(scale_bits).to(acc_ty)

    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # row offsets times a row stride can pass 2^31 (Triton types ints as i32)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < NOUT

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # Block pointers: bounds are checked per block, not with (BLOCK, BLOCK) pointer and mask
    # tensors, which cost about 100 registers per thread at 128 x 128 x 64.
    x_blk = tl.make_block_ptr(x_ptr, (M, K), (stride_xm, 1), (row0, 0), (BLOCK_M, BLOCK_K), (1, 0))
    w_blk = tl.make_block_ptr(w_ptr, (K, NOUT), (stride_wk, stride_wn), (0, col0), (BLOCK_K, BLOCK_N), W_ORDER)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(x_blk, boundary_check=(0, 1), padding_option="zero")
        w = tl.load(w_blk, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=BASE_PRECISION)
        x_blk = tl.advance(x_blk, (0, BLOCK_K))
        w_blk = tl.advance(w_blk, (BLOCK_K, 0))

    if HAS_LORA:
        # K of the expand is r: walk it in chunks of 16 so the h / E tiles stay small at r = 64
        # (whole-r tiles spill next to a 128 x 128 accumulator); rows of other samples load as 0.
        row_sample = rows // T
        b_first = row0 // T
        b_last = (tl.minimum(row0 + BLOCK_M, M) - 1) // T
        for s in tl.static_range(S):
            off = OFFS[s]
            if (col0 < off + SLICE_W) & (col0 + BLOCK_N > off):
                e_cols = cols - off
                e_ok = col_ok & (e_cols >= 0) & (e_cols < SLICE_W)
                for b in tl.range(b_first, b_last + 1, num_stages=1):
                    h_rows = row_ok & (row_sample == b)
                    # Sample b's part apart, then selected into b's rows: other rows load h = 0, and 0 times a
                    # NaN / inf in b's factor is NaN, which must not reach another sample (make fuzz found it).
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
                    for j0 in tl.range(0, J, J_CHUNK, num_stages=1):
                        js = j0 + tl.arange(0, J_CHUNK)
                        j_ok = js < J
                        h = tl.load(h_ptr + rows64[:, None] * (S * J) + (s * J + js)[None, :],
                                    mask=h_rows[:, None] & j_ok[None, :], other=0.0).to(acc_ty)
                        e = tl.load(e_ptr + b * stride_eb + s * stride_es + js[:, None] * stride_ej
                                    + e_cols[None, :] * stride_en, mask=j_ok[:, None] & e_ok[None, :], other=0.0)
                        part = tl.dot(h, (e * scale).to(acc_ty), part, input_precision=LORA_PRECISION)
                    acc += tl.where(h_rows[:, None] & e_ok[None, :], part, 0.0)  # and the slice's columns only

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(acc_ty)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["scale_bits"])
def _mira_adapter_fwd_kernel(
    out_ptr, h_ptr, e_ptr,
    M, T, J, SLICE_W, scale_bits,
    stride_om, stride_eb, stride_es, stride_ej, stride_en,
    S: tl.constexpr, OFFS: tl.constexpr, J_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """In place: out[m, OFFS[s] + n] += scale * h[m, s] @ E[b(m), s, :, n], for n < SLICE_W.

    out (M, d_out) in x's dtype (upcast, added, rounded once), h (M, S*r) ct, E as the forward's.
    Grid: (cdiv(M, BLOCK_M), S * cdiv(SLICE_W, BLOCK_N)); only the slices' columns are touched.
    """
    pid_m = tl.program_id(0)
    pid_1 = tl.program_id(1)
    n_tiles = tl.cdiv(SLICE_W, BLOCK_N)
    pid_s = pid_1 // n_tiles
    pid_n = pid_1 % n_tiles
    off = _select_offset(pid_s, OFFS, S)
    ct = h_ptr.dtype.element_ty
    scale = _f64(scale_bits).to(ct)

    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # row offsets times a row stride can pass 2^31 (Triton types ints as i32)
    row_ok = rows < M
    row_sample = rows // T
    b_first = row0 // T
    b_last = (tl.minimum(row0 + BLOCK_M, M) - 1) // T
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < SLICE_W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)
    for b in tl.range(b_first, b_last + 1, num_stages=1):
        h_rows = row_ok & (row_sample == b)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=ct)  # sample b's rows only (see _mira_linear_fwd_kernel)
        for j0 in tl.range(0, J, J_CHUNK, num_stages=1):
            js = j0 + tl.arange(0, J_CHUNK)
            j_ok = js < J
            h = tl.load(h_ptr + rows64[:, None] * (S * J) + (pid_s * J + js)[None, :],
                        mask=h_rows[:, None] & j_ok[None, :], other=0.0)
            e = tl.load(e_ptr + b * stride_eb + pid_s * stride_es + js[:, None] * stride_ej
                        + cols[None, :] * stride_en, mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            part = tl.dot(h, e, part, input_precision=LORA_PRECISION)
        acc += tl.where(h_rows[:, None], part, 0.0)
    o_ptrs = out_ptr + rows64[:, None] * stride_om + (off + cols)[None, :]
    o_mask = row_ok[:, None] & col_ok[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(ct)
    tl.store(o_ptrs, (o + scale * acc).to(out_ptr.dtype.element_ty), mask=o_mask)


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
    off = _select_offset(pid_s, L_OFFS, NUM_SLICES)

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
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=LORA_PRECISION)
    tl.store(out_ptr + pid_b * stride_ob + pid_s * stride_os + fs[:, None] * stride_of + js[None, :] * stride_oj,
             alpha * acc, mask=f_ok[:, None] & j_ok[None, :])


@triton.jit
def _normalize_grad(u, u_norm, g, g_dot_unit):
    # d/du of u / max(|u|, eps) applied to g, with (u/|u|).g precomputed over the full width.
    unit = u / tl.maximum(u_norm, NORM_EPS)
    tangent = (g - unit * g_dot_unit) / tl.maximum(u_norm, NORM_EPS)
    return tl.where(u_norm > NORM_EPS, tangent, g / NORM_EPS)


@triton.jit
def _mira_dw_bwd_kernel(
    dmixed_a_ptr, dmixed_b_ptr, bank_a_ptr, bank_b_ptr, partial_ptr,
    B, N, FA, FB,
    N_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """First pass of dw[b, n] = <dA_b, bank_a[n]> + <dB_b, bank_b[n]>: one partial per column share.

    dmixed (B, FA), (B, FB) ct; banks flattened (N, FA), (N, FB); partial (SPLIT, B, N) ct.
    Grid: (cdiv(B, BLOCK_B), SPLIT); program (i, j) reduces column chunks j, j+SPLIT, ... in
    order. The second pass (``_mira_scores_bwd_kernel``) adds the SPLIT partials in order:
    a deterministic two-pass reduction that reads the banks with the whole device.
    """
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    n_split = tl.num_programs(1)
    ct = partial_ptr.dtype.element_ty
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    slots = tl.arange(0, N_PAD)
    slot_ok = slots < N

    dw = tl.zeros((BLOCK_B, N_PAD), dtype=ct)
    for f0 in range(pid_f * BLOCK_F, FA, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FA
        d = tl.load(dmixed_a_ptr + rows[:, None] * FA + fcols[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        bank = tl.load(bank_a_ptr + slots[:, None] * FA + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        dw = tl.dot(d, tl.trans(bank), dw, input_precision=LORA_PRECISION)
    for f0 in range(pid_f * BLOCK_F, FB, n_split * BLOCK_F):
        fcols = f0 + tl.arange(0, BLOCK_F)
        f_ok = fcols < FB
        d = tl.load(dmixed_b_ptr + rows[:, None] * FB + fcols[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        bank = tl.load(bank_b_ptr + slots[:, None] * FB + fcols[None, :],
                       mask=slot_ok[:, None] & f_ok[None, :], other=0.0).to(ct)
        dw = tl.dot(d, tl.trans(bank), dw, input_precision=LORA_PRECISION)
    tl.store(partial_ptr + pid_f * B * N + rows[:, None] * N + slots[None, :], dw,
             mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit(do_not_specialize=["eps_bits"])
def _mira_scores_bwd_kernel(
    partial_ptr, scores_ptr, weights_ptr, qnorm_ptr, knorm_ptr, q_ptr, k_ptr, dz_ptr, dq_ptr,
    B, N, DK, n_partials, eps_bits,
    stride_qb, stride_qk, stride_kn, stride_kk,
    SEPARATION: tl.constexpr, NEED_Q: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SCORE_PRECISION: tl.constexpr,
):
    """dw (sum of the partials, in order), dz = sep'(dw), and a column chunk of dquery.

    partial (n_partials, B, N), scores/weights (B, N), norms (B,), (N,) from the forward
    recompute; writes dz (B, N) ct (program column 0 only) and dq (B, DK) in query's dtype.
    dquery = normalize'(q) (dz @ unit(K)); its projection term (q/|q|).g equals
    sum_n dz[b, n] s[b, n] (s is the cosine), so every d_k chunk is independent.
    Grid: (cdiv(B, BLOCK_B), cdiv(DK, BLOCK_K)).
    """
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    ct = dz_ptr.dtype.element_ty
    eps = _f64(eps_bits).to(ct)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    slots = tl.arange(0, N_PAD)
    slot_ok = slots < N
    valid = row_ok[:, None] & slot_ok[None, :]
    bn = rows[:, None] * N + slots[None, :]

    dw = tl.zeros((BLOCK_B, N_PAD), dtype=ct)
    for i in range(0, n_partials):
        dw += tl.load(partial_ptr + i * B * N + bn, mask=valid, other=0.0)
    s = tl.load(scores_ptr + bn, mask=valid, other=0.0)
    w = tl.load(weights_ptr + bn, mask=valid, other=0.0)
    if SEPARATION == AFFINE:
        total = tl.sum(s, axis=1)
        denom = tl.where(tl.abs(total) >= eps, total, tl.where(total >= 0, eps, -eps))
        # Inside the clamp the denominator is a constant: no gradient through the sum.
        through_sum = tl.where(tl.abs(total) >= eps, tl.sum(dw * w, axis=1), 0.0)
        dz = tl.where(N == 1, dw, (dw - through_sum[:, None]) / denom[:, None])
    elif SEPARATION == SOFTMAX:
        dz = w * (dw - tl.sum(dw * w, axis=1)[:, None])
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
        q_norm = tl.load(qnorm_ptr + rows, mask=row_ok, other=0.0)
        k_norm = tl.load(knorm_ptr + slots, mask=slot_ok, other=1.0)
        g_dot_unit = tl.sum(dz * s, axis=1)
        dz_k = dz / tl.maximum(k_norm, NORM_EPS)[None, :]
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < DK
        kt = tl.load(k_ptr + slots[:, None] * stride_kn + cols[None, :] * stride_kk,
                     mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        g = tl.dot(dz_k, kt, input_precision=SCORE_PRECISION)
        qt = tl.load(q_ptr + rows[:, None] * stride_qb + cols[None, :] * stride_qk,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        dq = _normalize_grad(qt, q_norm[:, None], g, g_dot_unit[:, None])
        tl.store(dq_ptr + rows[:, None] * DK + cols[None, :], dq.to(dq_ptr.dtype.element_ty),
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
        qt = tl.load(q_ptr + bs[:, None] * stride_qb + cols[None, :] * stride_qk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0).to(ct)
        qt = qt / tl.maximum(q_norm, NORM_EPS)[:, None]
        g = tl.dot(tl.trans(dzt), qt, g, input_precision=SCORE_PRECISION)
    kt = tl.load(k_ptr + slots[:, None] * stride_kn + cols[None, :] * stride_kk,
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
            dt = tl.load(d_ptr + bs[:, None] * F + fcols[None, :], mask=b_ok[:, None] & f_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(wt), dt, acc, input_precision=LORA_PRECISION)
        tl.store(out_ptr + slots[:, None] * F + fcols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=slot_ok[:, None] & f_ok[None, :])
