"""The reference (the specification) against an independent, deliberately naive loop version."""

from __future__ import annotations

import math

import pytest
import torch

from mira_kernels import reference
from mira_kernels.reference import SEPARATIONS
from tests.mira_inputs import affine_sum, make_inputs, max_err


def naive_weights(query, keys, separation, eps):
    """Loops over samples and slots with Python floats (float64): no vectorised code shared with the reference."""
    B, N = query.shape[0], keys.shape[0]
    out = [[0.0] * N for _ in range(B)]
    for b in range(B):
        q = [float(v) for v in query[b]]
        qn = max(math.sqrt(sum(v * v for v in q)), 1e-12)
        cos = []
        for n in range(N):
            k = [float(v) for v in keys[n]]
            kn = max(math.sqrt(sum(v * v for v in k)), 1e-12)
            cos.append(sum(a * c for a, c in zip(q, k)) / (qn * kn))
        if separation == "affine":
            if N == 1:
                w = cos
            else:
                total = sum(cos)
                denom = total if abs(total) >= eps else math.copysign(eps, 1.0 if total >= 0 else -1.0)
                w = [c / denom for c in cos]
        elif separation == "softmax":
            m = max(cos) if cos else 0.0
            e = [math.exp(c - m) for c in cos]
            w = [v / sum(e) for v in e]
        elif separation == "relu":
            w = [max(c, 0.0) for c in cos]
        elif separation == "tanh":
            w = [math.tanh(c) for c in cos]
        elif separation == "sigmoid":
            w = [1 / (1 + math.exp(-c)) for c in cos]
        else:
            w = cos
        out[b] = w
    return torch.tensor(out, dtype=torch.float64).reshape(B, N)


def naive_mira_linear(inp, separation, scale, eps):
    x, W, bias = inp.x, inp.weight, inp.bias
    B, T, _ = x.shape
    N, S, r, _ = inp.bank_a.shape
    d_s = inp.bank_b.shape[2]
    w = naive_weights(inp.query, inp.keys, separation, eps)
    y = x @ W.T + (bias if bias is not None else 0)
    for b in range(B):
        for s, off in enumerate(inp.slice_offsets):
            A = torch.zeros(r, x.shape[2], dtype=torch.float64)
            Bm = torch.zeros(d_s, r, dtype=torch.float64)
            for n in range(N):  # per slot
                A += w[b, n] * inp.bank_a[n, s]
                Bm += w[b, n] * inp.bank_b[n, s]
            for t in range(T):
                h = A @ x[b, t]
                y[b, t, off : off + d_s] += scale * (Bm @ h)
    return y


REGIMES = ["random", "one_slot", "uniform", "negative", "near_zero"]


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("regime", REGIMES)
def test_reference_matches_naive_loops(separation, regime):
    inp = make_inputs(B=3, T=4, d_in=7, d_out=15, N=4, S=2, r=2, d_s=5, offsets=[9, 1], regime=regime, seed=3)
    got = reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, separation=separation, scale=0.7)
    want = naive_mira_linear(inp, separation, 0.7, reference.DEFAULT_EPS)
    assert max_err(got, want) < 1e-12 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("N", [0, 1, 2])
def test_reference_small_memories(separation, N):
    inp = make_inputs(B=2, T=3, d_in=5, d_out=8, N=N, S=1, r=1, d_s=8, offsets=[0])
    got = reference.mira_linear(*inp.linear_args(), slice_offsets=[0], separation=separation)
    assert max_err(got, naive_mira_linear(inp, separation, 1.0, reference.DEFAULT_EPS)) < 1e-12
    if N == 0:
        assert torch.equal(got, torch.nn.functional.linear(inp.x, inp.weight, inp.bias))


def test_affine_single_slot_is_raw_cosine():
    inp = make_inputs(N=1)
    w = reference.retrieval_weights(inp.query, inp.keys)
    assert torch.allclose(w, reference.cosine_scores(inp.query, inp.keys), atol=0, rtol=0)


def test_near_zero_regime_is_inside_the_guard():
    inp = make_inputs(N=4, regime="near_zero")
    assert affine_sum(inp).abs().max() < reference.DEFAULT_EPS


def test_affine_guard_bounds_weights_and_keeps_gradient():
    inp = make_inputs(N=6, regime="near_zero", B=2)
    q = inp.query.clone().requires_grad_(True)
    w = reference.retrieval_weights(q, inp.keys, separation="affine")
    assert w.abs().max() <= 1.0 / reference.DEFAULT_EPS + 1e-9  # |cos| <= 1 over |denominator| >= eps
    assert torch.isfinite(w).all()
    # Weights still sum to ~0 / eps, not to 1, inside the guard: documented, and finite.
    w.square().sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_guard_keeps_fp16_finite():
    # Queries whose cosines sum to ~1e-4, LoRA-scale factors (B ~ 0.01): the guard bounds |w| <= 1/eps,
    # and the fp16 output stays finite; without an effective guard (eps below |sum|) it overflows.
    inp = make_inputs(B=4, T=6, d_in=16, d_out=48, N=8, regime="near_zero")
    inp.bank_b = inp.bank_b * 0.01
    half = inp.to(torch.float16, torch.float32)
    y = reference.mira_linear(*half.linear_args(), slice_offsets=half.slice_offsets)
    assert torch.isfinite(y).all()
    unguarded = reference.mira_linear(*half.linear_args(), slice_offsets=half.slice_offsets, eps=1e-6)
    assert not torch.isfinite(unguarded).all()


def test_cosine_norm_floor_matches_normalize():
    q = torch.zeros(2, 4, dtype=torch.float64)
    q[1, 0] = 1e-14  # below the 1e-12 floor: scaled by 1e12, not renormalised
    k = torch.eye(4, dtype=torch.float64)
    z = reference.cosine_scores(q, k)
    assert torch.equal(z[0], torch.zeros(4, dtype=torch.float64))
    assert z[1, 0].item() == pytest.approx(1e-2)


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("regime", ["random", "negative", "near_zero"])
def test_explicit_backward_matches_autograd(separation, regime):
    inp = make_inputs(B=2, T=3, d_in=6, d_out=12, N=3, S=2, r=2, d_s=4, offsets=[0, 8], regime=regime)
    inp.requires_grad_("x", "query", "keys", "bank_a", "bank_b")
    y = reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, separation=separation, scale=0.5)
    grad_out = torch.randn_like(y)
    want = torch.autograd.grad(y, (inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b), grad_out)
    got = reference.mira_linear_backward(
        grad_out, inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b,
        slice_offsets=inp.slice_offsets, separation=separation, scale=0.5,
    )
    for name, g, w in zip(("x", "query", "keys", "bank_a", "bank_b"), got, want):
        assert max_err(g, w) < 1e-10, name


def test_explicit_backward_output_mask():
    inp = make_inputs()
    grads = reference.mira_linear_backward(
        torch.ones(2, 5, 36, dtype=torch.float64), inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b,
        slice_offsets=inp.slice_offsets, output_mask=(True, False, True, False, False),
    )
    assert [g is not None for g in grads] == [True, False, True, False, False]


def test_reference_mixed_precision_runs_memory_in_fp32():
    inp = make_inputs(B=2, T=4, d_in=8, d_out=24, N=3)
    half = inp.to(torch.bfloat16, torch.float32)
    y = reference.mira_linear(*half.linear_args(), slice_offsets=half.slice_offsets)
    assert y.dtype == torch.bfloat16
    want = reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert max_err(y, want) < 0.05 * want.abs().max().item()
    # And the memory side really in float32: with the memory rounded to bfloat16 as well the error
    # is ~5x larger here (0.0095 against 0.0019 of max|y|), which the bound above would also accept.
    low = inp.to(torch.bfloat16, torch.bfloat16)
    y_low = reference.mira_linear(*low.linear_args(), slice_offsets=low.slice_offsets)
    assert max_err(y, want) < 0.5 * max_err(y_low, want)
