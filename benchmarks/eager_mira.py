"""A paper-style eager MIRA implementation: the baseline the fused op is measured against.

This is how a research code base typically writes MIRA's adapted projection: plain PyTorch, one
``einsum`` per step, one adapter per slice computed separately, and the per-sample update
brought to the projection's full width by concatenating it with a zero tensor for the untouched
K slice before one extra add. Every step is a separate op with its own pass over memory:

```
q      = x[:, 0]                                  (B, d)        identity query on the CLS token
s      = einsum("bd,nd->bn", unit(q), unit(keys)) (B, N)        cosine similarity
w      = s / sum(s)                               (B, N)        affine separation
A_s    = einsum("bn,nrd->brd", w, bank_a[:, s])   per slice     (B, r, d_in)
B_s    = einsum("bn,ner->ber", w, bank_b[:, s])   per slice     (B, d_s, r)
h_s    = einsum("btd,brd->btr", x, A_s)                         (B, T, r)
u_s    = einsum("btr,ber->bte", h_s, B_s)                       (B, T, d_s)
delta  = cat([u_q, zeros(K slice), u_v])                        (B, T, d_out)
y      = base(x) + scale * delta
```

It is written here (not taken from the authors' code) and kept deliberately unfused; it must
compute the same function as ``mira_kernels.mira_linear`` so the benchmark can assert that
before timing. Deviations from the published code, for that reason: the affine denominator is
guarded exactly as the package's contract guards it (sign-preserving clamp of |sum s| to at least
``eps``; two element-wise ops on a (B, 1) tensor, nothing measurable), and a single slot takes its
raw cosine as its weight, as the contract says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mira_kernels import DEFAULT_EPS

__all__ = ["EagerMiraLinear", "attach_eager"]


class EagerMiraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a paper-style eager MIRA adapter on some output slices.

    The query is the identity of the CLS token of the layer's own input, which for timm's packed
    ``attn.qkv`` is exactly the block's attention input (MIRA's published configuration).

    Args:
        base: the frozen projection, weight (d_out, d_in).
        keys: (N, d_k) memory keys, d_k == d_in.
        bank_a: (N, S, r, d_in) stored A factors.
        bank_b: (N, S, d_s, r) stored B factors.
        slice_offsets: S output-column offsets, each slice d_s wide, non-overlapping.
        scale: multiplies the adapter's contribution.
        eps: guard of the affine denominator.
    """

    def __init__(
        self,
        base: nn.Linear,
        keys: torch.Tensor,
        bank_a: torch.Tensor,
        bank_b: torch.Tensor,
        slice_offsets: Sequence[int],
        *,
        scale: float = 1.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        n, s, _, d_in = bank_a.shape
        d_s = bank_b.shape[2]
        if keys.shape != (n, d_in) or bank_b.shape[:2] != (n, s) or len(slice_offsets) != s:
            raise ValueError(
                f"inconsistent memory: keys {tuple(keys.shape)}, bank_a {tuple(bank_a.shape)}, "
                f"bank_b {tuple(bank_b.shape)}, {len(slice_offsets)} slice offsets"
            )
        self.base = base
        self.register_buffer("keys", keys.detach().clone())
        self.register_buffer("bank_a", bank_a.detach().clone())
        self.register_buffer("bank_b", bank_b.detach().clone())
        self.scale = float(scale)
        self.eps = float(eps)
        # The output columns as an ordered list of (slice index or None for a zero gap, width):
        # the zero-padded concatenation below follows it.
        pieces: list[tuple[int | None, int]] = []
        cursor = 0
        for s_idx, off in sorted(enumerate(slice_offsets), key=lambda item: item[1]):
            if off < cursor or off + d_s > base.out_features:
                raise ValueError(f"slices at {list(slice_offsets)} of width {d_s} overlap or leave the output")
            if off > cursor:
                pieces.append((None, off - cursor))
            pieces.append((s_idx, d_s))
            cursor = off + d_s
        if cursor < base.out_features:
            pieces.append((None, base.out_features - cursor))
        self._pieces = pieces

    def retrieval_weights(self, query: torch.Tensor) -> torch.Tensor:
        """(B, d_k) -> (B, N) affine weights, as the paper computes them (plus the guard)."""
        unit_q = F.normalize(query, dim=-1)
        unit_k = F.normalize(self.keys, dim=-1)
        scores = torch.einsum("bd,nd->bn", unit_q, unit_k)
        if scores.shape[-1] == 1:  # the contract: one slot takes its raw cosine as its weight
            return scores
        total = scores.sum(-1, keepdim=True)
        sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        return scores / torch.where(total.abs() >= self.eps, total, sign * self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out)."""
        weights = self.retrieval_weights(x[:, 0])
        updates = []
        for s_idx in range(self.bank_a.shape[1]):
            mixed_a = torch.einsum("bn,nrd->brd", weights, self.bank_a[:, s_idx])
            mixed_b = torch.einsum("bn,ner->ber", weights, self.bank_b[:, s_idx])
            shrunk = torch.einsum("btd,brd->btr", x, mixed_a)
            updates.append(torch.einsum("btr,ber->bte", shrunk, mixed_b))
        columns = [
            updates[s_idx] if s_idx is not None else x.new_zeros(x.shape[0], x.shape[1], width)
            for s_idx, width in self._pieces
        ]
        return self.base(x) + self.scale * torch.cat(columns, dim=-1)


def attach_eager(
    model: nn.Module,
    memories: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    slice_offsets: Sequence[int],
    *,
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> nn.Module:
    """Replaces ``model.blocks[i].attn.qkv`` by an :class:`EagerMiraLinear`, in place.

    Args:
        model: a timm Vision Transformer (``blocks[i].attn.qkv`` is a packed ``nn.Linear``).
        memories: one ``(keys, bank_a, bank_b)`` per block, in block order.
        slice_offsets: output offsets of the adapted slices (Q at 0, V at 2*d for a packed qkv).

    Returns:
        ``model``.
    """
    blocks = list(model.blocks)
    if len(memories) != len(blocks):
        raise ValueError(f"{len(memories)} memories for {len(blocks)} blocks")
    for block, (keys, bank_a, bank_b) in zip(blocks, memories):
        block.attn.qkv = EagerMiraLinear(block.attn.qkv, keys, bank_a, bank_b, slice_offsets, scale=scale, eps=eps)
    return model
