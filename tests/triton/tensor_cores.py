"""A CPU model of an fp32 ``tl.dot`` on NVIDIA tensor cores, for precision tests without a GPU.

Triton lowers a "tf32" dot of fp32 operands to TF32 MMA instructions, and a "tf32x3" dot to three
of them (its F32DotTC pass): hi = the operand rounded to TF32 (``cvt.rna``), lo = operand - hi, and
lo*hi + hi*lo + hi*hi accumulated in that order. The tensor core reads an fp32 register's top 19
bits (lo truncated to TF32), forms each k-group's products exactly and adds their sum to the fp32
accumulator rounded toward zero, not to nearest (Fasi, Higham, Mikaitis, Pranesh, "Numerical
behavior of NVIDIA tensor cores", PeerJ CS 2021, for V100 to A100; the model assumes Hopper alike,
and it predicts the second H200 run's dquery error to within its spread). Round-toward-zero errors
all point one way, so they grow with the dot's length rather than its square root: this is what
separates a tensor-core fp32 dot from an FMA (or cuBLAS fp32) one, whose roundings are to nearest.

The k-group is 8 (TF32 m16n8k8 / wgmma k8). "ieee" and 16-bit or fp64 dots are not modelled here.
"""

from __future__ import annotations

import torch

GROUP = 8


def tf32_rna(a: torch.Tensor) -> torch.Tensor:
    """fp32 ``a`` rounded to TF32 (10 explicit mantissa bits), to nearest, ties away (cvt.rna)."""
    bits = a.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    # Non-finite values and values whose rounding would carry into the exponent's all-ones pattern
    # keep their bits (the interpreter's inputs are finite where this model is used).
    return torch.where(torch.isfinite(a), rounded.view(torch.float32), a)


def tf32_trunc(a: torch.Tensor) -> torch.Tensor:
    """What an MMA reads of an fp32 register: the low 13 mantissa bits dropped."""
    return (a.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def _toward_zero(v: torch.Tensor) -> torch.Tensor:
    # float64 -> float32, rounded toward zero.
    r = v.to(torch.float32)
    over = r.to(torch.float64).abs() > v.abs()
    return torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    for k0 in range(0, a.shape[-1], GROUP):
        exact = a[..., k0:k0 + GROUP].double() @ b[..., k0:k0 + GROUP, :].double()
        acc = _toward_zero(acc.double() + exact)
    return acc


def dot(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None, precision: str = "tf32x3") -> torch.Tensor:
    """``acc + a @ b`` (fp32, batched like ``@``) as a Triton ``tl.dot`` of ``precision`` runs on tensor cores."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    if acc is None:
        acc = torch.zeros_like(a[..., :1] @ b[..., :1, :])
    acc = acc.to(torch.float32)
    if precision == "tf32":
        return _accumulate(acc, tf32_trunc(a), tf32_trunc(b))
    if precision != "tf32x3":
        raise ValueError(f"no tensor-core model for {precision!r}")
    a_hi, b_hi = tf32_rna(a), tf32_rna(b)
    a_lo, b_lo = tf32_trunc(a - a_hi), tf32_trunc(b - b_hi)
    for x, y in ((a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)):
        acc = _accumulate(acc, x, y)
    return acc


def chunked_dot(a: torch.Tensor, b: torch.Tensor, block_k: int, precision: str = "tf32x3") -> torch.Tensor:
    """``a @ b`` as a kernel loop of ``tl.dot`` over ``block_k``-deep steps into one accumulator."""
    acc = None
    for k0 in range(0, a.shape[-1], block_k):
        acc = dot(a[..., k0:k0 + block_k], b[..., k0:k0 + block_k, :], acc, precision)
    return acc
