"""Launchers of the MIRA Triton kernels: workspaces, grids, configs, and the launch plans.

Every op is first *planned* (outputs and workspaces allocated, one :class:`Launch` per kernel
with its grid, arguments and constexprs) and then run. Plans only read shapes, strides and
dtypes, so the same code plans for real CUDA tensors, for CPU tensors under the Triton
interpreter (tests), and for ``meta`` tensors when the lowering tests compile the exact
launches of the benchmark shapes ahead of time. Grids depend on shapes only and nothing reads
tensor data on the host: the ops can be captured in a CUDA graph.
"""

from __future__ import annotations

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


def interpreting() -> bool:
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

    def run(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def run_all(launches: Sequence[Launch], device: torch.device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            for launch in launches:
                launch.run()
    else:  # the interpreter runs on CPU tensors
        for launch in launches:
            launch.run()


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
    # The memory-bound adapter kernels (mixing, shrink, per-sample reductions, in-place expand)
    # can afford 3xTF32 (about fp32 accuracy on tensor cores); only the expand inside the
    # compute-bound projection GEMM keeps one TF32 product.
    return "tf32x3" if lora_precision == "tf32" else lora_precision


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
# Memory side: scores + separation + mixing.
# ----------------------------------------------------------------------------------------------


@dataclass
class _Mixed:
    a: torch.Tensor  # (B, S, r, d_in) ct
    b: torch.Tensor  # (B, S, d_s, r) ct
    scores: torch.Tensor | None = None  # (B, N) ct
    weights: torch.Tensor | None = None  # (B, N) ct
    qnorm: torch.Tensor | None = None  # (B,) ct
    knorm: torch.Tensor | None = None  # (N,) ct


def _plan_mix(sh: _Shapes, query, keys, bank_a, bank_b, separation, eps, save_stats, lora_precision, device,
              launches) -> _Mixed:
    ct = sh.ct
    mixed = _Mixed(
        a=torch.empty(sh.B, sh.S, sh.r, sh.d_in, dtype=ct, device=device),
        b=torch.empty(sh.B, sh.S, sh.d_s, sh.r, dtype=ct, device=device),
    )
    if save_stats:
        mixed.scores = torch.empty(sh.B, sh.N, dtype=ct, device=device)
        mixed.weights = torch.empty(sh.B, sh.N, dtype=ct, device=device)
        mixed.qnorm = torch.empty(sh.B, dtype=ct, device=device)
        mixed.knorm = torch.empty(sh.N, dtype=ct, device=device)
    cfg = configs.memory_config(sh.N, ct, lora_precision)
    b_tiles = triton_cdiv(sh.B, cfg.block_b)
    split = configs.split_for(b_tiles, triton_cdiv(max(sh.fa, sh.fb), cfg.block_f))
    placeholder = mixed.a
    launches.append(Launch(
        "mix_fwd", kernels._mira_mix_fwd_kernel, (b_tiles, split),
        dict(
            q_ptr=query, k_ptr=keys, bank_a_ptr=bank_a, bank_b_ptr=bank_b, mixed_a_ptr=mixed.a, mixed_b_ptr=mixed.b,
            scores_ptr=mixed.scores if save_stats else placeholder,
            weights_ptr=mixed.weights if save_stats else placeholder,
            qnorm_ptr=mixed.qnorm if save_stats else placeholder,
            knorm_ptr=mixed.knorm if save_stats else placeholder,
            B=sh.B, N=sh.N, DK=sh.d_k, FA=sh.fa, FB=sh.fb, eps_bits=float_bits(eps),
            stride_qb=query.stride(0), stride_qk=query.stride(1), stride_kn=keys.stride(0), stride_kk=keys.stride(1),
        ),
        dict(SEPARATION=SEPARATION_CODES[separation], SAVE_STATS=bool(save_stats), N_PAD=cfg.n_pad,
             BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, BLOCK_F=cfg.block_f,
             SCORE_PRECISION=_score_precision(lora_precision), LORA_PRECISION=_accurate(lora_precision)),
        num_warps=cfg.num_warps, num_stages=2,
    ))
    return mixed


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Row kernels.
# ----------------------------------------------------------------------------------------------


def _plan_shrink(name, inp, in_offsets, k, f, f_strides, j, sh: _Shapes, lora_precision, launches) -> torch.Tensor:
    """out (M, len(in_offsets) * j) = per-row in[:, off_s : off_s + k] @ F[b, s]^T (see the kernel)."""
    num_slices = len(in_offsets)
    out = torch.empty(sh.M, num_slices * j, dtype=sh.ct, device=inp.device)
    cfg = configs.row_config(configs.padded(j), sh.ct, lora_precision)
    launches.append(Launch(
        name, kernels._mira_shrink_fwd_kernel, (triton_cdiv(sh.M, cfg.block_m), num_slices),
        dict(in_ptr=inp, f_ptr=f, out_ptr=out, M=sh.M, T=sh.T, K=k, J=j, stride_im=inp.stride(0),
             stride_fb=f_strides[0], stride_fs=f_strides[1], stride_fj=f_strides[2], stride_fk=f_strides[3]),
        dict(NUM_SLICES=num_slices, IN_OFFS=tuple(in_offsets), J_PAD=configs.padded(j),
             BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, LORA_PRECISION=_accurate(lora_precision)),
        num_warps=cfg.num_warps, num_stages=2,
    ))
    return out


def _plan_gemm(name, a, w, w_strides, bias, h, e, e_strides, out, sh: _Shapes, j, offsets, slice_w, scale,
               has_lora, x_dtype, launches) -> None:
    """out (M, n_out) = a (M, k) @ W + bias + scale * fused expand of h with E (see the kernel)."""
    m, k = a.shape
    n_out = out.shape[1]
    base_precision, lora_precision = _precisions(x_dtype)
    cfg = configs.gemm_config(m, n_out, k, x_dtype, base_precision)
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n_out, cfg.block_n),)
    launches.append(Launch(
        name, kernels._mira_linear_fwd_kernel, grid,
        dict(x_ptr=a, w_ptr=w, bias_ptr=bias if bias is not None else out, h_ptr=h, e_ptr=e, out_ptr=out,
             M=m, NOUT=n_out, K=k, T=sh.T, J=j, SLICE_W=slice_w, scale_bits=float_bits(scale),
             stride_xm=a.stride(0), stride_wk=w_strides[0], stride_wn=w_strides[1],
             stride_eb=e_strides[0], stride_es=e_strides[1], stride_ej=e_strides[2], stride_en=e_strides[3],
             stride_om=out.stride(0), stride_bias=bias.stride(0) if bias is not None else 0),
        dict(S=len(offsets), OFFS=tuple(offsets), HAS_BIAS=bias is not None, HAS_LORA=bool(has_lora),
             J_CHUNK=configs.MIN_DOT, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             GROUP_M=cfg.group_m, BASE_PRECISION=base_precision, LORA_PRECISION=lora_precision,
             UPCAST=bool(interpreting() and x_dtype == torch.bfloat16),
             W_ORDER=(0, 1) if w_strides[0] == 1 and w_strides[1] != 1 else (1, 0)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))


def _mixed_b_as_expand(mixed: _Mixed) -> tuple[int, int, int, int]:
    # E[b, s, j, n] = mixed_b[b, s, n, j]
    st = mixed.b.stride()
    return st[0], st[1], st[3], st[2]


# ----------------------------------------------------------------------------------------------
# Public plans.
# ----------------------------------------------------------------------------------------------


def _memory_inputs(query, keys, bank_a, bank_b):
    # Banks are read as flat (N, F) rows; parameters are contiguous already, so this is free.
    return query, keys, bank_a.contiguous(), bank_b.contiguous()


def plan_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """Plan of the forward: returns (y (B, T, d_out) in x's dtype, launches)."""
    sh = _Shapes.of(x, keys, bank_a, bank_b)
    d_out = weight.shape[0]
    launches: list[Launch] = []
    y = torch.empty(sh.B, sh.T, d_out, dtype=x.dtype, device=x.device)
    if sh.M == 0:
        return y, launches
    x2 = x.contiguous().view(sh.M, sh.d_in)
    query, keys, bank_a, bank_b = _memory_inputs(query, keys, bank_a, bank_b)
    lora_precision = _precisions(x.dtype)[1]
    has_lora = sh.N > 0
    if has_lora:
        mixed = _plan_mix(sh, query, keys, bank_a, bank_b, separation, eps, False, lora_precision, x.device, launches)
        h = _plan_shrink("shrink_fwd", x2, (0,), sh.d_in, mixed.a,
                         (mixed.a.stride(0), 0, mixed.a.stride(2), mixed.a.stride(3)), sh.S * sh.r, sh, lora_precision,
                         launches)
        e, e_strides = mixed.b, _mixed_b_as_expand(mixed)
    else:  # no slots: the adapter is zero, only the base projection runs
        h = e = x2.new_empty(0, dtype=sh.ct)
        e_strides = (0, 0, 0, 0)
    _plan_gemm("linear_fwd", x2, weight, (weight.stride(1), weight.stride(0)), bias, h, e, e_strides,
               y.view(sh.M, d_out), sh, sh.r, slice_offsets, sh.d_s, scale, has_lora, x.dtype, launches)
    return y, launches


def _flattenable(out: torch.Tensor) -> bool:
    return out.stride(2) == 1 and (out.shape[0] <= 1 or out.stride(0) == out.shape[1] * out.stride(1))


def plan_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """Plan of the in-place adapter add. Returns (target, launches): ``target`` is ``out`` or a
    contiguous copy that the caller copies back (for outputs whose rows cannot be flattened)."""
    sh = _Shapes.of(x, keys, bank_a, bank_b)
    launches: list[Launch] = []
    if sh.M == 0 or sh.N == 0:
        return out, launches
    target = out if _flattenable(out) else out.contiguous()
    x2 = x.contiguous().view(sh.M, sh.d_in)
    query, keys, bank_a, bank_b = _memory_inputs(query, keys, bank_a, bank_b)
    lora_precision = _precisions(x.dtype)[1]
    mixed = _plan_mix(sh, query, keys, bank_a, bank_b, separation, eps, False, lora_precision, x.device, launches)
    h = _plan_shrink("shrink_fwd", x2, (0,), sh.d_in, mixed.a,
                     (mixed.a.stride(0), 0, mixed.a.stride(2), mixed.a.stride(3)), sh.S * sh.r, sh, lora_precision,
                     launches)
    cfg = configs.adapter_config(x.dtype, lora_precision)
    e_strides = _mixed_b_as_expand(mixed)
    stride_om = target.stride(1)
    launches.append(Launch(
        "adapter_fwd", kernels._mira_adapter_fwd_kernel,
        (triton_cdiv(sh.M, cfg.block_m), sh.S * triton_cdiv(sh.d_s, cfg.block_n)),
        dict(out_ptr=target, h_ptr=h, e_ptr=mixed.b, M=sh.M, T=sh.T, J=sh.r, SLICE_W=sh.d_s,
             scale_bits=float_bits(scale), stride_om=stride_om, stride_eb=e_strides[0], stride_es=e_strides[1],
             stride_ej=e_strides[2], stride_en=e_strides[3]),
        dict(S=sh.S, OFFS=tuple(slice_offsets), J_CHUNK=configs.MIN_DOT,
             BLOCK_M=cfg.block_m,
             BLOCK_N=cfg.block_n, LORA_PRECISION=_accurate(lora_precision)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))
    return target, launches


def plan_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps,
                         output_mask):
    """Plan of the backward: returns ((dx, dquery, dkeys, dbank_a, dbank_b), launches).

    Recomputes weights, mixed factors and the shrink from the inputs (the forward saves only its
    inputs). Gradients not asked for are None.
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

    d_out = weight.shape[0]
    g2 = grad_out.contiguous().view(sh.M, d_out)
    x2 = x.contiguous().view(sh.M, sh.d_in)
    query, keys, bank_a, bank_b = _memory_inputs(query, keys, bank_a, bank_b)
    lora_precision = _precisions(x.dtype)[1]
    has_lora = sh.N > 0
    need_dw = has_lora and (need_q or need_k)
    need_da = has_lora and (need_a or need_dw)
    need_db = has_lora and (need_b or need_dw)
    need_dh = has_lora and (need_x or need_da)

    mixed = None
    if has_lora:
        mixed = _plan_mix(sh, query, keys, bank_a, bank_b, separation, eps, need_dw or need_a or need_b,
                          lora_precision, device, launches)
    h = dh = None
    if need_db:
        h = _plan_shrink("shrink_fwd", x2, (0,), sh.d_in, mixed.a,
                         (mixed.a.stride(0), 0, mixed.a.stride(2), mixed.a.stride(3)), sh.S * sh.r, sh,
                         lora_precision, launches)
    if need_dh:
        # Unscaled dh_s = G_s B_b,s; F[b, s, j, k] = mixed_b[b, s, k, j].
        st = mixed.b.stride()
        dh = _plan_shrink("shrink_bwd", g2, tuple(slice_offsets), sh.d_s, mixed.b, (st[0], st[1], st[3], st[2]),
                          sh.r, sh, lora_precision, launches)

    if need_x:
        if has_lora:
            e, e_strides = mixed.a, mixed.a.stride()
        else:
            dh = e = x2.new_empty(0, dtype=sh.ct)
            e_strides = (0, 0, 0, 0)
        _plan_gemm("linear_bwd_dx", g2, weight, (weight.stride(0), weight.stride(1)), None, dh, e, e_strides,
                   dx.view(sh.M, sh.d_in), sh, sh.r, (0,) * sh.S, sh.d_in, scale, has_lora, x.dtype, launches)

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
            dict(l_ptr=x2, r_ptr=dh, out_ptr=dmixed_a, T=sh.T, FD=sh.d_in, J=sh.S * sh.r, alpha_bits=float_bits(scale),
                 stride_lm=x2.stride(0), stride_rm=dh.stride(0), stride_ob=dmixed_a.stride(0), stride_os=0,
                 stride_of=1, stride_oj=sh.d_in),
            dict(NUM_SLICES=1, L_OFFS=(0,), J_PAD=configs.padded(sh.S * sh.r),
                 BLOCK_T=row_cfg.block_k, BLOCK_F=row_cfg.block_m, LORA_PRECISION=_accurate(lora_precision)),
            num_warps=row_cfg.num_warps, num_stages=2,
        ))

    mem = configs.memory_config(sh.N, sh.ct, lora_precision)
    if need_dw:
        # Two passes: partial dw per column share of the banks, then their ordered sum.
        b_tiles = triton_cdiv(sh.B, mem.block_b)
        split = configs.split_for(b_tiles, triton_cdiv(max(sh.fa, sh.fb), mem.block_f))
        partial = torch.empty(split, sh.B, sh.N, dtype=sh.ct, **dev)
        launches.append(Launch(
            "dw_bwd", kernels._mira_dw_bwd_kernel, (b_tiles, split),
            dict(dmixed_a_ptr=dmixed_a, dmixed_b_ptr=dmixed_b, bank_a_ptr=bank_a, bank_b_ptr=bank_b,
                 partial_ptr=partial, B=sh.B, N=sh.N, FA=sh.fa, FB=sh.fb),
            dict(N_PAD=mem.n_pad, BLOCK_B=mem.block_b, BLOCK_F=mem.block_f, LORA_PRECISION=_accurate(lora_precision)),
            num_warps=mem.num_warps, num_stages=2,
        ))
        dz = torch.empty(sh.B, sh.N, dtype=sh.ct, **dev)
        score_precision = _score_precision(lora_precision)
        k_chunks = triton_cdiv(sh.d_k, mem.grad_k) if need_q else 1
        launches.append(Launch(
            "scores_bwd", kernels._mira_scores_bwd_kernel, (b_tiles, k_chunks),
            dict(partial_ptr=partial, scores_ptr=mixed.scores, weights_ptr=mixed.weights, qnorm_ptr=mixed.qnorm,
                 knorm_ptr=mixed.knorm, q_ptr=query, k_ptr=keys, dz_ptr=dz, dq_ptr=dq if need_q else dz,
                 B=sh.B, N=sh.N, DK=sh.d_k, n_partials=split, eps_bits=float_bits(eps),
                 stride_qb=query.stride(0), stride_qk=query.stride(1), stride_kn=keys.stride(0),
                 stride_kk=keys.stride(1)),
            dict(SEPARATION=SEPARATION_CODES[separation], NEED_Q=need_q, N_PAD=mem.n_pad, BLOCK_B=mem.block_b,
                 BLOCK_K=mem.grad_k, SCORE_PRECISION=score_precision),
            num_warps=mem.num_warps, num_stages=2,
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
