"""Input builders for MIRA op tests: shapes, weight regimes that stress the op, tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mira_kernels import reference


@dataclass
class OpInputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    query: torch.Tensor
    keys: torch.Tensor
    bank_a: torch.Tensor
    bank_b: torch.Tensor
    slice_offsets: list[int]

    def linear_args(self):
        return (self.x, self.weight, self.bias, self.query, self.keys, self.bank_a, self.bank_b)

    def adapter_args(self):
        return (self.x, self.query, self.keys, self.bank_a, self.bank_b)

    def to(self, dtype=None, memory_dtype=None) -> OpInputs:
        memory_dtype = memory_dtype or dtype

        def cast(t, dt):
            return None if t is None else t.detach().to(dt)

        return OpInputs(
            cast(self.x, dtype), cast(self.weight, dtype), cast(self.bias, dtype), cast(self.query, memory_dtype),
            cast(self.keys, memory_dtype), cast(self.bank_a, memory_dtype), cast(self.bank_b, memory_dtype),
            list(self.slice_offsets),
        )

    def requires_grad_(self, *names):
        for name in names:
            getattr(self, name).requires_grad_(True)
        return self


def make_inputs(
    B=2, T=5, d_in=12, d_out=36, N=4, S=2, r=3, d_s=None, *, regime="random", bias=True, dtype=torch.float64,
    offsets=None, seed=0,
) -> OpInputs:
    """Random op inputs. ``regime`` shapes the mixing weights the query/keys produce:

    random      Gaussian query and keys (affine weights of mixed sign, occasionally large)
    one_slot    each query equals one key: all cosine mass on that slot
    uniform     every key identical to the query: equal weights
    negative    keys anti-aligned with part of the query: some affine weights negative
    near_zero   keys built so that sum_n cos(q, k_n) is ~1e-4 (inside the affine guard)
    """
    g = torch.Generator().manual_seed(seed)
    d_s = d_s if d_s is not None else d_out // 3
    offsets = offsets if offsets is not None else [i * (d_out // S) for i in range(S)][:S]
    d_k = d_in

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(B, T, d_in)
    weight = randn(d_out, d_in) / d_in**0.5
    b = randn(d_out) if bias else None
    query = randn(B, d_k)
    keys = randn(N, d_k)
    if N > 0 and regime == "one_slot":
        keys = randn(N, d_k)
        query = keys[torch.arange(B) % N].clone() * 2.0
    elif N > 0 and regime == "uniform":
        keys = query[:1].repeat(N, 1)
        query = query[:1].repeat(B, 1)
    elif N > 0 and regime == "negative":
        keys = torch.cat([query[:1], -query[:1] * 0.5 + 0.3 * randn(1, d_k), randn(max(N - 2, 0), d_k)])[:N]
    elif N >= 2 and regime == "near_zero":
        # Per sample, pick keys whose cosines sum to ~1e-4: the last key is placed to cancel the others.
        query = randn(1, d_k).repeat(B, 1)
        unit_q = query[0] / query[0].norm()
        base = randn(N - 1, d_k)
        cos = (base / base.norm(dim=1, keepdim=True)) @ unit_q
        target = -(cos.sum() - 1e-4)  # cosine the last key must have
        target = target.clamp(-0.999, 0.999)
        ortho = randn(d_k)
        ortho = ortho - (ortho @ unit_q) * unit_q
        ortho = ortho / ortho.norm()
        last = target * unit_q + (1 - target**2).sqrt() * ortho
        keys = torch.cat([base, last[None]])
    bank_a = randn(N, S, r, d_in) / d_in**0.5
    bank_b = randn(N, S, d_s, r) / r**0.5
    inputs = OpInputs(x, weight, b, query, keys, bank_a, bank_b, list(offsets))
    return inputs.to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_spec(got, want64, pytorch_same_dtype, *, factor=2.0, floor=1e-6, what="output"):
    """The house criterion: error vs the float64 spec <= factor x plain PyTorch's own error at that dtype."""
    own = max_err(pytorch_same_dtype, want64)
    err = max_err(got, want64)
    scale = want64.double().abs().max().item() if want64.numel() else 1.0
    bound = factor * own + floor * max(1.0, scale)
    assert err <= bound, f"{what}: max-abs error {err:.3e} > {factor} x PyTorch's {own:.3e} (+floor) = {bound:.3e}"


def affine_sum(inputs: OpInputs) -> torch.Tensor:
    return reference.cosine_scores(inputs.query, inputs.keys).sum(-1)


def cls_query_forward_backward(inp, grad_out, backend, scale=1.0):
    """y and the gradients of (x, keys, bank_a, bank_b) of a projection whose query is x's CLS token
    view ``x[:, 0]``, as the layers pass it for a 16-bit x over a float32 memory (no cast): the
    query's gradient flows into x. Runs the public op under ``use_backend(backend)``."""
    import mira_kernels as mk

    leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.keys, inp.bank_a, inp.bank_b)]
    x, k, a, b = leaves
    with mk.use_backend(backend):
        y = mk.mira_linear(x, inp.weight, inp.bias, x[:, 0], k, a, b, slice_offsets=inp.slice_offsets,
                           separation="affine", scale=scale)
        y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def check_cls_query_against_spec(inp, exact, grad_out, backend, what, forward_bound=None):
    """The projection with the CLS-view query (:func:`cls_query_forward_backward`) on ``backend``
    against the float64 spec (``exact``: the same values in float64): y within 2x PyTorch's own error
    at the dtype, or inside the elementwise ``forward_bound`` when given; every gradient within 3x."""
    y, grads = cls_query_forward_backward(inp, grad_out, backend)
    want, want_g = cls_query_forward_backward(exact, grad_out, "reference")
    same, same_g = cls_query_forward_backward(inp, grad_out, "reference")
    if forward_bound is None:
        assert_close_to_spec(y, want, same, factor=2.0, what=f"forward {what}")
    else:
        excess = ((y.double() - want.double()).abs() - forward_bound).max().item()
        assert excess <= 0, f"forward {what}: outside the bound by {excess:.3e}"
    for name, got, w, s in zip(("x", "keys", "bank_a", "bank_b"), grads, want_g, same_g):
        assert_close_to_spec(got, w, s, factor=3.0, what=f"d{name} {what}")
