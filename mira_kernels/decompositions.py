"""The MIRA op written in standard ATen ops, for export targets that cannot call a custom op.

``torch.export`` keeps ``mira::mira_linear`` as one node (its fake kernel gives the shapes), and
AOTInductor calls the fused kernel from the compiled package. An ONNX graph, or any runtime
without this extension, needs the op spelled out in standard ops instead: :func:`export_decompositions`
is the table that ``ExportedProgram.run_decompositions`` applies for them. It is used only on an
exported program: eager calls and ``torch.compile`` keep the fused kernels, because nothing here
is registered with the dispatcher.

The decomposition computes exactly the contract's math (``docs/contract.md`` section 2; the
reference, :mod:`mira_kernels.reference`, is the specification) in shapes that export well:
matrix products instead of ``einsum``, and a concatenation instead of the reference's
``index_add`` scatter. Its dtypes follow section 4: for 16-bit x the scores, mixing and
adapter path run in float32 and the sum is rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _extension, reference
from .reference import DEFAULT_EPS

__all__ = ["export_decompositions", "mira_linear_decomposed"]


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
    batch, tokens, d_in = x.shape
    n, s, r, _ = bank_a.shape
    d_s = bank_b.shape[2]
    d_out = weight.shape[0]
    weights = reference.retrieval_weights(query, keys, separation=separation, eps=eps)  # (B, N), ct
    # Mixing as one matrix product per factor: (B, N) @ (N, S*r*d_in). Explicit sizes, not -1:
    # N may be 0.
    mixed_a = (weights @ bank_a.to(ct).reshape(n, s * r * d_in)).reshape(batch, s * r, d_in)
    mixed_b = (weights @ bank_b.to(ct).reshape(n, s * d_s * r)).reshape(batch, s, d_s, r)
    shrunk = torch.bmm(x.to(ct), mixed_a.transpose(1, 2))  # (B, T, S*r)
    shrunk = shrunk.reshape(batch, tokens, s, r).permute(0, 2, 1, 3)  # (B, S, T, r)
    delta = torch.matmul(shrunk, mixed_b.transpose(-1, -2)) * scale  # (B, S, T, d_s)

    # Slices in column order, zeros between them: one concatenation, no scatter.
    pieces, cursor = [], 0
    for off, index in sorted((int(off), i) for i, off in enumerate(slice_offsets)):
        if off > cursor:
            pieces.append(delta.new_zeros(batch, tokens, off - cursor))
        pieces.append(delta[:, index])
        cursor = off + d_s
    if cursor < d_out:
        pieces.append(delta.new_zeros(batch, tokens, d_out - cursor))
    update = torch.cat(pieces, dim=-1)
    base = F.linear(x, weight, bias)
    return (base.to(ct) + update).to(x.dtype)


def export_decompositions() -> dict:
    """``{op overload: decomposition}`` for ``ExportedProgram.run_decompositions``.

    Empty when the native extension is not loaded: the public functions then run the
    reference, already in standard ops, so an exported program holds no MIRA op.
    """
    if not _extension.loaded:
        return {}
    return {torch.ops.mira.mira_linear.default: mira_linear_decomposed}
