"""The precision rule of every GPU path, its CPU emulation, and its error bound (docs/contract.md section 11).

A GPU path does not compute ``mira_linear`` in the reference's arithmetic: tensor cores take their
operands in TF32 or a 16-bit type, the adapter's factors may be stored in 16 bits, a library GEMM
may round its output before the adapter is added. Each path's choices are written down here as a
:class:`Rule`. For every rule there is

- :func:`emulate`: the forward computed on the CPU with the operands rounded exactly where the
  rule rounds them (accumulation in float32, or float64 for the fp64 rule), the reference the
  GPU tests and the CPU tests compare with; and
- :func:`bound`: an elementwise bound on ``|y - y_exact|`` (``y_exact`` the float64 reference) that
  holds for any result computed under the rule, whatever the accumulation order, written as the
  sum of the terms the rule's roundings contribute (see the contract for the formula).

``rule_for(backend, x_dtype, allow_tf32)`` says which rule a backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference

__all__ = ["Rule", "RULES", "rule_for", "round_to", "emulate", "bound", "UNIT_ROUNDOFF"]

#: Unit roundoff of each operand format: the largest relative error of one rounding. ``tf32`` is
#: taken as truncation (tensor cores read an fp32 register's top 19 bits); ``tf32-rn`` is an fp32
#: value the kernel rounds to the nearest TF32 value itself before the dot (half the error);
#: ``3xtf32`` is the error of one product of a three-pass split-TF32 dot (the dropped lo*lo term and
#: the truncation of each lo part: 3 * 2^-20); ``exact`` operands are not rounded.
UNIT_ROUNDOFF = {
    "exact": 0.0,
    "fp64": 2.0**-53,
    "fp32": 2.0**-24,
    "3xtf32": 3 * 2.0**-20,
    "tf32": 2.0**-10,
    "tf32-rn": 2.0**-11,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
}


@dataclass(frozen=True)
class Rule:
    """Where a GPU path rounds. Formats are keys of :data:`UNIT_ROUNDOFF`.

    Attributes:
        name: the rule's name in the contract.
        base: operand format of the base products x W^T ("exact" when x and W are already in it).
        accumulate: format every product is accumulated in.
        scores: product format of the cosine scores (q . k).
        mixing: product format of the mixing sum_n w_n bank[n].
        factors: format the mixed A_b is stored in before the shrink (and B_b, unless ``factors_b``).
        adapter: operand format of the shrink x A_b^T (and of the expand, unless ``expand``).
        h: format the shrink's result h is rounded to before the expand ("fp32": not rounded).
        factors_b: format the mixed B_b is stored in (None: ``factors``).
        expand: operand format of the expand h B_b^T (None: ``adapter``).
        base_rounded: the base output is rounded to x's dtype before the adapter is added (a
            library GEMM followed by a separate adapter pass): two roundings of y instead of one.
        grad_scores: format of the backward's cosines, their affine sum and the weights (each
            rounded once to the compute dtype): dquery and dkeys scale the sum's error by about
            1/sum^2, so near the affine guard they need more than fp32 (contract section 11).
            The ``fp32`` rule is shared: there the Triton backend computes them in fp64, the
            ``cuda`` backend (so far) in fp32.
        grad_dw: product format of the backward's dw = <dA_b, bank_a> + <dB_b, bank_b> ("fp32":
            FMA units, rounding to nearest; not tensor cores, whose fp32 sums round toward zero).
    """

    name: str
    base: str
    accumulate: str
    scores: str
    mixing: str
    factors: str
    adapter: str
    h: str
    base_rounded: bool = False
    grad_scores: str = "fp64"
    grad_dw: str = "fp32"
    factors_b: str | None = None
    expand: str | None = None

    @property
    def b_format(self) -> str:
        return self.factors_b or self.factors

    @property
    def expand_format(self) -> str:
        return self.expand or self.adapter


RULES = {
    r.name: r
    for r in (
        Rule("fp64", base="fp64", accumulate="fp64", scores="fp64", mixing="fp64", factors="fp64", adapter="fp64",
             h="fp64", grad_dw="fp64"),
        Rule("fp32", base="fp32", accumulate="fp32", scores="fp32", mixing="fp32", factors="fp32", adapter="fp32",
             h="fp32"),
        Rule("fp32-tf32", base="tf32", accumulate="fp32", scores="3xtf32", mixing="3xtf32", factors="fp32",
             adapter="tf32", h="fp32"),
        # fp16 x: factors and h in fp32 (fp16's range would overflow where the reference does not),
        # the adapter's products 3xTF32: one TF32 product (10-bit h and B_b) cost up to 4 ulp of an
        # fp16 output the adapter dominates, 4x PyTorch's error on the first GPU run.
        Rule("fp16", base="exact", accumulate="fp32", scores="3xtf32", mixing="3xtf32", factors="fp32",
             adapter="3xtf32", h="fp32"),
        # bf16 x: the shrink on bf16 operands (x and A_b stored in bf16); h and B_b kept in fp32 and
        # rounded to nearest TF32 for the expand's TF32 dot. With h and B_b in bf16 (the rule until
        # 2026-12-07) their two roundings, 2^-9 of the adapter each, came on top of the output's own:
        # 2.07x PyTorch's error on the H200 (ViT-B/16, B = 1, CLS query), up to 2.9x emulated.
        Rule("bf16", base="exact", accumulate="fp32", scores="3xtf32", mixing="3xtf32", factors="bf16",
             adapter="exact", h="fp32", factors_b="fp32", expand="tf32-rn"),
        # The CUDA C++ backend: cuBLAS base GEMM rounded to x's dtype, adapter on CUDA cores in fp32.
        Rule("cuda-16bit", base="exact", accumulate="fp32", scores="fp32", mixing="fp32", factors="fp32",
             adapter="fp32", h="fp32", base_rounded=True, grad_scores="fp32"),
        Rule("cuda-fp32-tf32", base="tf32", accumulate="fp32", scores="fp32", mixing="fp32", factors="fp32",
             adapter="fp32", h="fp32", base_rounded=True, grad_scores="fp32"),
    )
}


def rule_for(backend: str, x_dtype: torch.dtype, allow_tf32: bool = False) -> Rule:
    """The rule ``backend`` ("triton" or "cuda") computes ``mira_linear`` under for x of ``x_dtype``
    (``allow_tf32``: ``torch.backends.cuda.matmul.allow_tf32``, which both backends follow)."""
    if x_dtype == torch.float64:
        return RULES["fp64"]
    if x_dtype == torch.float32:
        if backend == "cuda":
            return RULES["cuda-fp32-tf32"] if allow_tf32 else RULES["fp32"]
        return RULES["fp32-tf32"] if allow_tf32 else RULES["fp32"]
    if x_dtype in (torch.float16, torch.bfloat16):
        if backend == "cuda":
            return RULES["cuda-16bit"]
        return RULES["fp16" if x_dtype == torch.float16 else "bf16"]
    raise TypeError(f"no precision rule for x of dtype {x_dtype}")


# ----------------------------------------------------------------------------------------------
# Emulation.
# ----------------------------------------------------------------------------------------------

_TORCH = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def round_to(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` rounded to operand format ``fmt`` (returned in t's dtype). ``tf32`` truncates the low 13
    mantissa bits of the fp32 value; ``tf32-rn`` rounds it to nearest, ties away from zero, as the
    Triton kernels' ``_tf32_round`` does (a finite value that would round past the largest one is
    truncated; non-finite values are kept); ``3xtf32`` and ``exact`` leave the value as it is."""
    if fmt in ("exact", "3xtf32"):
        return t
    if fmt in ("tf32", "tf32-rn"):
        bits = t.to(torch.float32).contiguous().view(torch.int32)
        cut = bits & ~0x1FFF
        if fmt == "tf32-rn":
            up = (bits + 0x1000) & ~0x1FFF  # on the magnitude bits: the sign bit is never reached
            finite = (bits & 0x7F800000) != 0x7F800000
            fits = (up & 0x7F800000) != 0x7F800000
            cut = torch.where(finite & fits, up, torch.where(finite, cut, bits))
        return cut.view(torch.float32).to(t.dtype)
    return t.to(_TORCH[fmt]).to(t.dtype)


def emulate(rule: Rule, x, weight, bias, query, keys, bank_a, bank_b, *, slice_offsets, separation="affine",
            scale=1.0, eps=reference.DEFAULT_EPS) -> torch.Tensor:
    """``mira_linear`` computed on the CPU with every operand rounded where ``rule`` rounds it.

    Products accumulate in the rule's accumulation format; the result has x's dtype. This is the
    reference a GPU result is compared with when the question is "did the kernel do what its rule
    says" rather than "is the rule accurate" (that is :func:`bound`'s job).
    """
    acc = _TORCH[rule.accumulate]
    ct = reference.compute_dtype(x.dtype)
    weights = reference.retrieval_weights(query.to(ct), keys.to(ct), separation=separation, eps=eps).to(acc)
    mixed_a, mixed_b = reference.mix_adapters(weights, bank_a.to(acc), bank_b.to(acc))
    mixed_a = round_to(round_to(mixed_a, rule.factors), rule.adapter)
    mixed_b = round_to(round_to(mixed_b, rule.b_format), rule.expand_format)
    xa = round_to(x.to(acc), rule.adapter)
    h = torch.einsum("btd,bsrd->btsr", xa, mixed_a)
    h = round_to(round_to(scale * h, rule.h), rule.expand_format)  # the kernels scale h before rounding it
    delta = torch.einsum("btsr,bser->btse", h, mixed_b)
    base = round_to(x.to(acc), rule.base) @ round_to(weight.to(acc), rule.base).T
    if bias is not None:
        base = base + bias.to(acc)
    if rule.base_rounded:
        base = base.to(x.dtype).to(acc)
    full = reference._scatter_slices(delta, slice_offsets, weight.shape[0])
    return (base + full).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Bound.
# ----------------------------------------------------------------------------------------------


def _gamma(n: int, u: float) -> float:
    # Higham's gamma_n = n u / (1 - n u): the bound on the relative error of an n-term sum of
    # products in precision u, in any order.
    return n * u / (1.0 - n * u)


def _weight_error(scores, weights, separation, eps, delta_s):
    """Elementwise bound on |w_kernel - w_exact| given |s_kernel - s_exact| <= delta_s."""
    n = scores.shape[-1]
    if separation == "affine" and n > 1:
        total = scores.sum(-1, keepdim=True)
        inside = total.abs() < eps
        denom = torch.where(inside, torch.full_like(total, eps), total.abs())
        # w = s / d: |dw| <= (|ds| + |w| |dd|) / |d| with |dd| <= N |ds| (d constant inside the clamp).
        through_sum = torch.where(inside, torch.zeros_like(total), torch.full_like(total, n * delta_s))
        return (delta_s + weights.abs() * through_sum) / (denom - torch.where(inside, 0.0, n * delta_s)).clamp_min(
            eps / 2)
    if separation == "softmax":
        return 2.0 * delta_s * weights.abs() * (1 + 2 * n * delta_s)
    lipschitz = {"affine": 1.0, "relu": 1.0, "tanh": 1.0, "identity": 1.0, "sigmoid": 0.25}[separation]
    return torch.full_like(weights, lipschitz * delta_s)


def bound(rule: Rule, x, weight, bias, query, keys, bank_a, bank_b, *, slice_offsets, separation="affine",
          scale=1.0, eps=reference.DEFAULT_EPS) -> torch.Tensor:
    """Elementwise bound (float64, shape of y) on ``|y - y_exact|`` for any result computed under ``rule``.

    With u_op the unit roundoff of a format, g(n) = gamma_n(u_accumulate), K = d_in, and absolute
    values taken elementwise (``|A|_w = sum_n (|w_n| + dw_n) |bank_a[n]|``, ``|B|_w`` likewise, dw the
    weights' error bound from the scores' error ``ds = g_s(d_k + 4)``)::

        |y - y_exact| <= u_out |y_exact|
                       + (1 + u_out) [ (2 u_base + g(K)) (|x| |W|^T + |bias|)
                                       + [base_rounded] u_out |x W^T + bias|
                                       + |scale| e_ad (|x| |A|_w^T) |B|_w^T + |scale| (|x| dA) |B|_w^T + ... ]

    where ``e_ad = 2 u_adapter + 2 u_expand + u_factors + u_factors_b + u_h + 2 g(K + r) + g_mix(N)``
    (x and A_b rounded to the shrink's operand format, h and B_b to the expand's, each factor stored,
    h stored, the two sums, the mixing sum; until 2026-12-07 the expand's two operand roundings were
    missing, which under-counted the TF32 rules by 2^-9 of the adapter) and the dA / dB terms carry
    the weights' error through the mixing. Second-order terms are covered by a factor 1.01. Not
    covered: where |sum_n s| is within N ds of 0 under the affine guard the sign of the guarded
    denominator is decided by rounding (the weights may flip sign).
    """
    f64 = torch.float64
    u = UNIT_ROUNDOFF
    u_out = u[{torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[x.dtype]]
    u_acc = u[rule.accumulate]
    d_in = x.shape[-1]
    r = bank_a.shape[2]
    n_slots = keys.shape[0]

    X, W = x.to(f64), weight.to(f64)
    q, k = query.to(f64), keys.to(f64)
    exact = reference.mira_linear(X, W, None if bias is None else bias.to(f64), q, k, bank_a.to(f64),
                                  bank_b.to(f64), slice_offsets=slice_offsets, separation=separation, scale=scale,
                                  eps=eps)

    base_abs = X.abs() @ W.abs().T
    if bias is not None:
        base_abs = base_abs + bias.to(f64).abs()
    base_term = (2 * u[rule.base] + _gamma(d_in, u_acc)) * base_abs
    if rule.base_rounded:
        base_val = X @ W.T + (0 if bias is None else bias.to(f64))
        base_term = base_term + u_out * base_val.abs() * (1 + _gamma(d_in, u_acc))

    adapter_term = torch.zeros_like(exact)
    if n_slots > 0:
        scores = reference.cosine_scores(q, k)
        weights = reference.separate(scores, separation, eps)
        delta_s = _gamma(query.shape[-1] + 4, u[rule.scores])
        dw = _weight_error(scores, weights, separation, eps, delta_s)
        wa = weights.abs() + dw
        a_abs = torch.einsum("bn,nsrd->bsrd", wa, bank_a.to(f64).abs())
        b_abs = torch.einsum("bn,nser->bser", wa, bank_b.to(f64).abs())
        da = torch.einsum("bn,nsrd->bsrd", dw, bank_a.to(f64).abs())
        db = torch.einsum("bn,nser->bser", dw, bank_b.to(f64).abs())
        h_abs = torch.einsum("btd,bsrd->btsr", X.abs(), a_abs)
        e_ad = (2 * u[rule.adapter] + 2 * u[rule.expand_format] + u[rule.factors] + u[rule.b_format] + u[rule.h]
                + 2 * _gamma(d_in + r, u_acc) + _gamma(n_slots, u[rule.mixing]))
        rounding = e_ad * torch.einsum("btsr,bser->btse", h_abs, b_abs)
        weights_err = (torch.einsum("btsr,bser->btse", torch.einsum("btd,bsrd->btsr", X.abs(), da), b_abs)
                       + torch.einsum("btsr,bser->btse", h_abs, db))
        adapter_term = reference._scatter_slices(abs(scale) * (rounding + weights_err), slice_offsets,
                                                 weight.shape[0])
    total = u_out * exact.abs() + (1 + u_out) * (base_term + adapter_term)
    return 1.01 * total + torch.finfo(f64).tiny
