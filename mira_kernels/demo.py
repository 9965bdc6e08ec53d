"""A short tour of the MIRA op on this machine: ``python -m mira_kernels.demo``.

Builds a ViT-B/16-sized qkv projection with a 30-slot memory, checks the default backend
against the float64 reference, and prints what ran.
"""

from __future__ import annotations

import time

import torch

import mira_kernels as mk


def main() -> None:
    torch.manual_seed(0)
    B, T, d, N, r = 2, 197, 768, 30, 4
    x = torch.randn(B, T, d)
    weight, bias = torch.randn(3 * d, d) / d**0.5, torch.randn(3 * d)
    query, keys = torch.randn(B, d), torch.randn(N, d)
    bank_a = torch.randn(N, 2, r, d) / d**0.5
    bank_b = torch.randn(N, 2, d, r) * 0.01
    offsets = [0, 2 * d]  # Q and V of a packed qkv

    backend = mk.resolve_backend("cpu")
    print(f"available CPU backends: {mk.available_backends('cpu')}; default: {backend}")
    start = time.perf_counter()
    y = mk.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets=offsets)
    elapsed = time.perf_counter() - start
    spec = mk.reference.mira_linear(
        *(t.double() for t in (x, weight, bias, query, keys, bank_a, bank_b)), slice_offsets=offsets
    )
    print(f"mira_linear {tuple(x.shape)} -> {tuple(y.shape)} in {elapsed * 1e3:.1f} ms (one cold call)")
    print(f"max-abs error vs the float64 reference: {(y.double() - spec).abs().max().item():.2e}")
    w = mk.retrieval_weights(query, keys)
    print(f"affine weights: row sums {w.sum(-1).tolist()}, min {w.min().item():.3f}, max {w.max().item():.3f}")


if __name__ == "__main__":
    main()
