"""The MIRA ops written in standard ATen ops, for export targets that cannot call a custom op.

``torch.export`` keeps ``mira::mira_linear`` (and ``mira::mira_adapter_``) as one node (its fake
kernel gives the shapes), and AOTInductor calls the fused kernel from the compiled package. An
ONNX graph, or any runtime without this extension, needs the ops spelled out in standard ops
instead: :func:`export_decompositions` is the table that ``ExportedProgram.run_decompositions``
applies for them. It is used only on an exported program: eager calls and ``torch.compile`` keep
the fused kernels, because nothing here is registered with the dispatcher (:func:`mira.export.decompose`
hands the in-place op's decomposition to the Python dispatcher of its retrace only).

The decompositions compute exactly the contract's math (``docs/contract.md`` section 2; the
reference, :mod:`mira_kernels.reference`, is the specification) in shapes that export well:
matrix products instead of ``einsum``, and a concatenation instead of the reference's
``index_add`` scatter. Their dtypes follow section 4: for 16-bit x the scores, mixing and
adapter path run in float32 and the sum is rounded once. Their constants (``scale``, ``eps``,
the norm floor) are tensors of the compute dtype, so a float64 graph keeps them exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from . import _extension, reference
from .reference import DEFAULT_EPS, NORM_EPS

__all__ = ["export_decompositions", "mira_adapter_decomposed", "mira_linear_decomposed"]


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor of ``like``'s dtype and device, which a traced program holds as a constant.

    Not a Python float: torch.onnx writes a Python scalar (and ``torch.full``'s) as a float32 constant,
    which rounded a float64 graph's scale (0.7 -> 0.699999988), eps and norm floor. Made outside the
    trace: ``run_decompositions`` refuses the in-place lift of a ``torch.tensor`` traced in a decomposition.
    """
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        return torch.tensor(value, dtype=like.dtype, device=like.device)


def _normalize(u: torch.Tensor) -> torch.Tensor:
    """:func:`mira_kernels.reference.normalize`, its floor a constant of u's dtype."""
    return reference.normalize(u, _constant(NORM_EPS, u))


def _retrieval_weights(query: torch.Tensor, keys: torch.Tensor, separation: str, eps: float) -> torch.Tensor:
    """:func:`mira_kernels.reference.retrieval_weights` with its constants in the compute dtype. (B, N)."""
    ct = reference.compute_dtype(torch.promote_types(query.dtype, keys.dtype))
    query, keys = query.to(ct), keys.to(ct)
    return reference.separate(_normalize(query) @ _normalize(keys).T, separation, _constant(eps, query))


def _slice_updates(x, query, keys, bank_a, bank_b, separation, scale, eps) -> torch.Tensor:
    """The adapter's update of every slice, (B, S, T, d_s), in the compute dtype."""
    ct = reference.compute_dtype(x.dtype)
    batch, tokens, d_in = x.shape
    n, s, r, _ = bank_a.shape
    d_s = bank_b.shape[2]
    weights = _retrieval_weights(query, keys, separation, eps)  # (B, N), ct
    # Mixing as one matrix product per factor: (B, N) @ (N, S*r*d_in). Explicit sizes, not -1:
    # N may be 0.
    mixed_a = (weights @ bank_a.to(ct).reshape(n, s * r * d_in)).reshape(batch, s * r, d_in)
    mixed_b = (weights @ bank_b.to(ct).reshape(n, s * d_s * r)).reshape(batch, s, d_s, r)
    shrunk = torch.bmm(x.to(ct), mixed_a.transpose(1, 2))  # (B, T, S*r)
    shrunk = shrunk.reshape(batch, tokens, s, r).permute(0, 2, 1, 3)  # (B, S, T, r)
    return torch.matmul(shrunk, mixed_b.transpose(-1, -2)) * _constant(scale, shrunk)  # (B, S, T, d_s)


def _in_column_order(slice_offsets: Sequence[int], d_s: int, d_out: int):
    """(start, stop, slice index or None for a gap) covering [0, d_out) left to right."""
    cursor = 0
    for off, index in sorted((int(off), i) for i, off in enumerate(slice_offsets)):
        if off > cursor:
            yield cursor, off, None
        yield off, off + d_s, index
        cursor = off + d_s
    if cursor < d_out:
        yield cursor, d_out, None


def mira_linear_decomposed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """``mira::mira_linear`` in standard ops; the op's positional signature (``backend`` is ignored).

    Shapes as :func:`mira_kernels.mira_linear`; returns (B, T, d_out) in x's dtype.
    """
    ct = reference.compute_dtype(x.dtype)
    batch, tokens, _ = x.shape
    delta = _slice_updates(x, query, keys, bank_a, bank_b, separation, scale, eps)
    # Slices in column order, zeros between them: one concatenation, no scatter.
    pieces = [delta[:, index] if index is not None else delta.new_zeros(batch, tokens, stop - start)
              for start, stop, index in _in_column_order(slice_offsets, delta.shape[-1], weight.shape[0])]
    update = torch.cat(pieces, dim=-1)
    base = F.linear(x, weight, bias)
    return (base.to(ct) + update).to(x.dtype)


def mira_adapter_decomposed(
    out: torch.Tensor,
    x: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> None:
    """``mira::mira_adapter_`` in standard ops, in place into ``out``; the op's positional signature.

    Each slice of ``out`` gets its update added in the compute dtype and rounded once, as
    :func:`mira_kernels.reference.mira_adapter_`; the columns between slices are copied unchanged.
    """
    if keys.shape[0] == 0:  # an empty memory adds exactly zero: x is not read (contract, section 1)
        return
    ct = reference.compute_dtype(x.dtype)
    delta = _slice_updates(x, query, keys, bank_a, bank_b, separation, scale, eps)
    pieces = [out[..., start:stop] if index is None else (out[..., start:stop].to(ct) + delta[:, index]).to(out.dtype)
              for start, stop, index in _in_column_order(slice_offsets, delta.shape[-1], out.shape[2])]
    out.copy_(torch.cat(pieces, dim=-1))


def export_decompositions() -> dict:
    """``{op overload: decomposition}`` for ``ExportedProgram.run_decompositions``.

    Empty when the native extension is not loaded: the public functions then run the
    reference, already in standard ops, so an exported program holds no MIRA op.
    """
    if not _extension.loaded:
        return {}
    return {torch.ops.mira.mira_linear.default: mira_linear_decomposed,
            torch.ops.mira.mira_adapter_.default: mira_adapter_decomposed}
