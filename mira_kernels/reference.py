"""Plain-PyTorch reference of the MIRA ops: the specification every backend is judged against.

Everything here is written with ordinary differentiable PyTorch ops, runs in any floating
dtype (float64 included, for gradcheck) and on any device. Kernels must match it; where a
kernel and this file disagree, this file is right. The contract these functions implement is
written down in ``docs/contract.md``.

Shapes (see ``docs/contract.md`` section 1)::

    x       (B, T, d_in)      tokens
    weight  (d_out, d_in)     frozen projection;  bias (d_out,) or None
    query   (B, d_k)          one query per sample
    keys    (N, d_k)          one key per memory slot
    bank_a  (N, S, r, d_in)   stored LoRA "A" factors, one per slot and output slice
    bank_b  (N, S, d_s, r)    stored LoRA "B" factors
    slice_offsets             S output-column offsets, slice s covers [off_s, off_s + d_s)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SEPARATIONS",
    "DEFAULT_EPS",
    "NORM_EPS",
    "compute_dtype",
    "normalize",
    "cosine_scores",
    "separate",
    "retrieval_weights",
    "mix_adapters",
    "adapter_delta",
    "mira_linear",
    "mira_adapter_",
    "mira_linear_backward",
]

#: Separation functions, in the order the contract lists them.
SEPARATIONS = ("affine", "softmax", "relu", "tanh", "sigmoid", "identity")

#: Default guard of the affine denominator: |sum_n s| is clamped (sign kept) to at least this,
#: so |w| <= max|s| / eps <= 100. See docs/contract.md section 3 for why this value.
DEFAULT_EPS = 1e-2

#: Norm floor of the cosine, as in ``torch.nn.functional.normalize``.
NORM_EPS = 1e-12


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Dtype in which scores, mixing and the adapter path run: float32 for 16-bit x."""
    return torch.float32 if x_dtype in (torch.float16, torch.bfloat16) else x_dtype


def _scaled(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, s, ||v||) with v = u / s, s = max_j |u_j| per row (1 for zero or non-finite rows).

    ||u||^2 overflows float32 for |u| ~ 1e19 (and underflows for |u| ~ 1e-19), which turned a
    huge query's unit vector into zeros; ||u|| = s * ||v|| with ||v|| in [1, sqrt(d)] cannot.
    s is detached: u / ||u|| does not depend on it, so the gradient is exact.
    """
    m = u.detach().abs().amax(dim=-1, keepdim=True) if u.shape[-1] else u.new_zeros(*u.shape[:-1], 1)
    s = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
    v = u / s
    return v, s, torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def normalize(u: torch.Tensor, floor: float | torch.Tensor = NORM_EPS) -> torch.Tensor:
    """u / max(||u||, floor) along the last dim, as ``F.normalize``, with ||u|| computed without
    overflow or underflow (the op's kernels compute it in double). A row with inf or NaN gives NaN
    where ``F.normalize`` does (inf / inf), so non-finite inputs still propagate. ``floor`` is always
    NORM_EPS; a tensor of it in u's dtype keeps it exact in an exported graph (decompositions.py)."""
    v, s, norm_v = _scaled(u)
    above = ~(norm_v < floor / s)  # ||u|| >= floor, or NaN: the unit-vector branch
    return torch.where(above, v / torch.where(above, norm_v, torch.ones_like(norm_v)), u / floor)


def cosine_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query to every key, (B, d_k) x (N, d_k) -> (B, N)."""
    return normalize(query) @ normalize(keys).T


def _guarded_denominator(total: torch.Tensor, eps: float) -> torch.Tensor:
    # Sign-preserving clamp: |d| >= eps, sign(0) taken as +. Inside the clamp d is a constant,
    # so the gradient still flows through the numerator (w = s / d) and stays bounded.
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    return torch.where(total.abs() >= eps, total, sign * eps)


def separate(scores: torch.Tensor, separation: str = "affine", eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Separation function of the Hopfield read-out, applied row-wise to (B, N) scores.

    ``affine``: s / sum(s) with a guarded denominator for N >= 2; the raw score for N = 1.
    ``softmax``: over the N slots. ``relu``, ``tanh``, ``sigmoid``, ``identity``: element-wise,
    not renormalised.
    """
    if separation == "affine":
        if scores.shape[-1] == 1:
            return scores
        return scores / _guarded_denominator(scores.sum(-1, keepdim=True), eps)
    if separation == "softmax":
        return torch.softmax(scores, dim=-1)
    if separation == "relu":
        return torch.relu(scores)
    if separation == "tanh":
        return torch.tanh(scores)
    if separation == "sigmoid":
        return torch.sigmoid(scores)
    if separation == "identity":
        return scores
    raise ValueError(f"unknown separation {separation!r}; expected one of {SEPARATIONS}")


def retrieval_weights(
    query: torch.Tensor, keys: torch.Tensor, *, separation: str = "affine", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Per-sample mixing weights w = sep(cos(query, keys)), (B, N), in the compute dtype."""
    ct = compute_dtype(torch.promote_types(query.dtype, keys.dtype))
    return separate(cosine_scores(query.to(ct), keys.to(ct)), separation, eps)


def mix_adapters(
    weights: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine combination of the stored factors: (B,S,r,d_in) and (B,S,d_s,r).

    A and B are mixed separately, so the applied update is (sum w A)(sum w B), rank r. The banks
    are converted to the weights' dtype first: 16-bit banks (contract section 4) are widened
    exactly, so the mixing is that of a float32 copy of them.
    """
    mixed_a = torch.einsum("bn,nsrd->bsrd", weights, bank_a.to(weights.dtype))
    mixed_b = torch.einsum("bn,nser->bser", weights, bank_b.to(weights.dtype))
    return mixed_a, mixed_b


def adapter_delta(
    x: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """MIRA's per-sample update of each slice, (B, T, S, d_s), in the compute dtype."""
    ct = compute_dtype(x.dtype)
    if keys.shape[0] == 0:  # an empty memory adds exactly zero: x is not read for it (contract, section 1)
        return x.new_zeros(*x.shape[:2], bank_b.shape[1], bank_b.shape[2], dtype=ct)
    weights = retrieval_weights(query.to(ct), keys.to(ct), separation=separation, eps=eps)
    mixed_a, mixed_b = mix_adapters(weights, bank_a, bank_b)
    shrunk = torch.einsum("btd,bsrd->btsr", x.to(ct), mixed_a)
    return scale * torch.einsum("btsr,bser->btse", shrunk, mixed_b)


def _scatter_slices(delta: torch.Tensor, slice_offsets: Sequence[int], d_out: int) -> torch.Tensor:
    # (B,T,S,d_s) -> (B,T,d_out), zeros outside the slices. Clear rather than fast: this is the spec.
    d_s = delta.shape[-1]
    full = delta.new_zeros(*delta.shape[:2], d_out)
    for s, off in enumerate(slice_offsets):
        full = full.index_add(-1, torch.arange(off, off + d_s, device=delta.device), delta[:, :, s])
    return full


def mira_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """y = x W^T + bias, plus MIRA's per-sample adapter on every slice. (B, T, d_out), x's dtype.

    For 16-bit x the base projection runs in x's dtype (as ``F.linear`` does), the adapter path
    in float32, and their sum is rounded once to x's dtype.
    """
    base = F.linear(x, weight, bias)
    delta = adapter_delta(x, query, keys, bank_a, bank_b, separation=separation, scale=scale, eps=eps)
    full = _scatter_slices(delta, slice_offsets, weight.shape[0])
    return (base.to(full.dtype) + full).to(x.dtype)


def mira_adapter_(
    out: torch.Tensor,
    x: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> None:
    """Adds MIRA's per-sample update in place into ``out`` (B, T, d_out)'s slices."""
    delta = adapter_delta(x, query, keys, bank_a, bank_b, separation=separation, scale=scale, eps=eps)
    d_s = delta.shape[-1]
    for s, off in enumerate(slice_offsets):
        view = out[..., off : off + d_s]
        view.copy_((view.to(delta.dtype) + delta[:, :, s]).to(out.dtype))


def _normalize_backward(u: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    # d/du of u / max(||u||, NORM_EPS): the tangent projection above the floor, 1/NORM_EPS below.
    _, s, norm_v = _scaled(u)
    norm = s * norm_v  # overflows only where ||u|| exceeds the dtype's range
    unit = normalize(u)
    tangent = (grad_unit - unit * (unit * grad_unit).sum(-1, keepdim=True)) / norm.clamp_min(NORM_EPS)
    return torch.where(~(norm_v < NORM_EPS / s), tangent, grad_unit / NORM_EPS)


def _separate_backward(
    grad_w: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, separation: str, eps: float
) -> torch.Tensor:
    if separation == "identity" or (separation == "affine" and scores.shape[-1] == 1):
        return grad_w
    if separation == "affine":
        total = scores.sum(-1, keepdim=True)
        denom = _guarded_denominator(total, eps)
        through_sum = (grad_w * weights).sum(-1, keepdim=True) * (total.abs() >= eps)
        return (grad_w - through_sum) / denom
    if separation == "softmax":
        return weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))
    if separation == "relu":  # as autograd of torch.relu: a select, so a NaN gradient stops where z <= 0
        return torch.where(scores <= 0, torch.zeros_like(grad_w), grad_w)
    if separation == "tanh":
        return grad_w * (1 - weights * weights)
    if separation == "sigmoid":
        return grad_w * weights * (1 - weights)
    raise ValueError(f"unknown separation {separation!r}; expected one of {SEPARATIONS}")


def mira_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
    output_mask: Sequence[bool] = (True, True, True, True, True),
) -> tuple[torch.Tensor | None, ...]:
    """Explicit backward of :func:`mira_linear`: (dx, dquery, dkeys, dbank_a, dbank_b).

    This is the formula every backend's backward implements (docs/contract.md section 5). It
    recomputes scores, weights, mixed factors and the shrink from the inputs; the forward saves
    nothing else. Gradients not asked for in ``output_mask`` are returned as None. Each gradient
    has the dtype of its input.
    """
    need_x, need_q, need_k, need_a, need_b = output_mask
    ct = compute_dtype(x.dtype)
    q, k, g = query.to(ct), keys.to(ct), grad_out.to(ct)
    scores = cosine_scores(q, k)
    weights = separate(scores, separation, eps)
    mixed_a, mixed_b = mix_adapters(weights, bank_a, bank_b)

    d_s = bank_b.shape[2]
    g_slices = torch.stack([g[..., off : off + d_s] for off in slice_offsets], dim=2)  # (B,T,S,d_s)
    xc = x.to(ct)
    shrunk = torch.einsum("btd,bsrd->btsr", xc, mixed_a)
    grad_shrunk = scale * torch.einsum("btse,bser->btsr", g_slices, mixed_b)
    grad_mixed_b = scale * torch.einsum("btse,btsr->bser", g_slices, shrunk)
    grad_mixed_a = torch.einsum("btsr,btd->bsrd", grad_shrunk, xc)

    grad_x = None
    if need_x and keys.shape[0] == 0:  # an empty memory adds exactly zero: grad_out is not read for it
        grad_x = (grad_out @ weight).to(x.dtype)
    elif need_x:
        adapter_part = torch.einsum("btsr,bsrd->btd", grad_shrunk, mixed_a)
        grad_x = ((grad_out @ weight).to(ct) + adapter_part).to(x.dtype)

    grad_bank_a = torch.einsum("bn,bsrd->nsrd", weights, grad_mixed_a).to(bank_a.dtype) if need_a else None
    grad_bank_b = torch.einsum("bn,bser->nser", weights, grad_mixed_b).to(bank_b.dtype) if need_b else None

    grad_query = grad_keys = None
    if (need_q or need_k) and keys.shape[0] == 0:  # an empty memory reads neither query nor keys
        grad_query = torch.zeros_like(query) if need_q else None
        grad_keys = torch.zeros_like(keys) if need_k else None
    elif need_q or need_k:
        grad_w = torch.einsum("bsrd,nsrd->bn", grad_mixed_a, bank_a.to(ct))
        grad_w = grad_w + torch.einsum("bser,nser->bn", grad_mixed_b, bank_b.to(ct))
        grad_scores = _separate_backward(grad_w, scores, weights, separation, eps)
        q_unit = normalize(q)
        k_unit = normalize(k)
        if need_q:
            grad_query = _normalize_backward(q, grad_scores @ k_unit).to(query.dtype)
        if need_k:
            grad_keys = _normalize_backward(k, grad_scores.T @ q_unit).to(keys.dtype)
    return grad_x, grad_query, grad_keys, grad_bank_a, grad_bank_b
