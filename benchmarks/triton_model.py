"""A performance MODEL (not a measurement) of the MIRA Triton kernels on an H100, no GPU needed.

``python -m benchmarks.triton_model`` prints, for the ViT-B/16 qkv projection (T=197, d=768,
d_out=2304, adapters on Q and V: S=2, d_s=768, d_k=768) and B in {1, 8, 64, 256}:

1. the bytes and FLOPs of every kernel of the Triton backend (forward, and the backward of a
   consolidation step where x, query and keys need gradients and the banks are frozen), their
   roofline time on an H100 SXM (3.35 TB/s HBM3; ~990 TFLOP/s dense bf16, ~495 TF32, ~67 FP32),
   and the same for cuBLAS plus an unfused PyTorch LoRA (the ops a straightforward
   implementation launches);
2. launch and host-dispatch terms: per-kernel device gap, and host time per ATen op, per
   custom-op call and per Triton launch;
3. the modelled time and overhead over the plain qkv GEMM (``F.linear``), in eager mode
   (max of host and device time: at B=1 the host decides) and in a CUDA graph (device only).

Every number printed is computed from the formulas below and the assumptions in
:class:`Hardware`; none was measured on a GPU. Roofline means each kernel runs at the better
of its compute or memory bound, with each tensor read from DRAM once (L2 reuse assumed for
re-reads of tiles, except the banks when they do not fit in L2). Real kernels reach a
fraction of the roofline; that fraction is not modelled, so small overheads here are floors.

Precisions follow the kernels: bf16 base GEMM, TF32 expand inside it, 3xTF32 (three TF32
products) for the cosines and the memory-bound adapter kernels (mixing, shrink, reductions).

Results: ``benchmarks/results/triton_model.txt`` (this script's output).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from mira_kernels.triton import configs

# --------------------------------------------------------------------------------------------
# Assumptions.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """H100 SXM figures and host-side costs (assumptions; change them on the command line)."""

    name: str = "H100 SXM (model)"
    hbm: float = 3.35e12  # bytes/s
    bf16: float = 990e12  # dense FLOP/s
    tf32: float = 495e12
    fp32: float = 67e12  # FMA units (IEEE fp32 dots, element-wise work)
    l2: float = 50e6  # bytes
    sms: int = 132
    kernel_gap: float = 1.5e-6  # device time per kernel beyond its roofline (launch latency, ramp, tail)
    # Host time per call (docs/kernels.md section 2, measured on this project's CPUs; a fast
    # server CPU is about 2x quicker, which helps both sides of every ratio below).
    aten_op: float = 5e-6  # one eager ATen op (F.linear, bmm, add, ...)
    autograd_node: float = 2e-6  # extra host time per autograd node in the backward
    custom_op: float = 14e-6  # the public torch.library op: Python wrapper, validation, dispatch
    custom_op_autograd: float = 14e-6  # its autograd node and backward op call on top
    triton_launch: float = 10e-6  # one Triton kernel launch from Python


@dataclass(frozen=True)
class Layer:
    """One adapted projection: ViT-B/16 qkv, adapters on Q and V."""

    B: int
    r: int
    N: int
    T: int = 197
    d: int = 768
    d_out: int = 2304
    S: int = 2
    d_s: int = 768
    d_k: int = 768
    x_bytes: int = 2  # bf16 activations and weight

    @property
    def M(self) -> int:
        return self.B * self.T

    @property
    def fa(self) -> int:
        return self.S * self.r * self.d

    @property
    def fb(self) -> int:
        return self.S * self.d_s * self.r


@dataclass
class Kernel:
    """One kernel: its FLOPs per precision, DRAM bytes, and how many programs (CTAs) it runs.

    Time = max(compute, memory) where compute assumes each program runs on one SM at 1/SMs of
    the device's peak (so a grid smaller than the SM count, or a partial last wave, leaves the
    rest idle), and memory lets a lone SM pull up to 4x its 1/SMs share of HBM bandwidth.
    ``programs=None`` means a library kernel assumed to fill the device (cuBLAS, ATen).
    """

    name: str
    bytes: float
    flops: dict[str, float] = field(default_factory=dict)  # precision -> FLOPs
    programs: int | None = None

    def _terms(self, hw: Hardware) -> tuple[float, float]:
        peak = {"bf16": hw.bf16, "tf32": hw.tf32, "fp32": hw.fp32}
        compute = sum(f / peak[p] for p, f in self.flops.items())
        memory = self.bytes / hw.hbm
        if self.programs:
            waves = math.ceil(self.programs / hw.sms)
            compute *= waves * hw.sms / self.programs
            memory /= min(1.0, 4.0 * min(self.programs, hw.sms) / hw.sms)
        return compute, memory

    def time(self, hw: Hardware) -> float:
        return max(self._terms(hw))

    def bound(self, hw: Hardware) -> str:
        compute, memory = self._terms(hw)
        return "compute" if compute > memory else "memory"

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


@dataclass
class Variant:
    """A way to compute the layer: its kernels and its host time (eager)."""

    name: str
    kernels: list[Kernel]
    host: float

    def device(self, hw: Hardware) -> float:
        return sum(k.time(hw) + hw.kernel_gap for k in self.kernels)

    def eager(self, hw: Hardware) -> float:
        # The CPU enqueues ahead of the GPU: the slower of the two sets the pace.
        return max(self.host, self.device(hw))

    def graph(self, hw: Hardware) -> float:
        # Inside a CUDA graph (torch.compile mode="reduce-overhead") the per-call host cost is
        # one replay for the whole model: ~0 per layer.
        return self.device(hw)


F32 = 4


def _gemm_flops(m, n, k) -> float:
    return 2.0 * m * n * k


def _samples_per_tile(lay: Layer, block_m: int) -> float:
    # A row tile of block_m rows touches 1 + (block_m - 1) / T samples on average; the expand and
    # shrink run one masked dot per sample touched (at most 2 for T = 197 and 128-row tiles).
    return min(1.0 + (block_m - 1) / lay.T, float(block_m))


# --------------------------------------------------------------------------------------------
# Plain projection.
# --------------------------------------------------------------------------------------------


def plain_forward(lay: Layer, hw: Hardware) -> Variant:
    xb = lay.x_bytes
    k = Kernel("F.linear (cuBLAS)", lay.M * lay.d * xb + lay.d * lay.d_out * xb + lay.M * lay.d_out * xb
               + lay.d_out * xb, {"bf16": _gemm_flops(lay.M, lay.d_out, lay.d)})
    return Variant("plain qkv GEMM", [k], hw.aten_op)


def plain_backward(lay: Layer, hw: Hardware) -> Variant:
    xb = lay.x_bytes
    k = Kernel("dx = G W (cuBLAS)", lay.M * lay.d_out * xb + lay.d * lay.d_out * xb + lay.M * lay.d * xb,
               {"bf16": _gemm_flops(lay.M, lay.d, lay.d_out)})
    return Variant("plain qkv GEMM backward", [k], hw.aten_op + hw.autograd_node)


# --------------------------------------------------------------------------------------------
# The Triton backend (mira_kernels/triton), with the tile sizes of its config table.
# --------------------------------------------------------------------------------------------


def _mix(lay: Layer, hw: Hardware, save_stats: bool) -> Kernel:
    import torch

    mem = configs.memory_config(lay.N, torch.float32)
    b_tiles = math.ceil(lay.B / mem.block_b)
    split = configs.split_for(b_tiles, math.ceil(max(lay.fa, lay.fb) / mem.block_f))
    # Each of the `split` programs of a 16-sample tile recomputes the tile's (16, n_pad) scores
    # (3xTF32: three tensor-core products); mixing is (16, n_pad) @ (n_pad, F) in TF32. The
    # sample tiles of one column share run side by side (grid axis 0), so a bank column chunk
    # comes from DRAM once and from L2 for the other tiles.
    score_flops = 3 * _gemm_flops(b_tiles * mem.block_b, mem.n_pad, lay.d_k) * split
    mix_flops = 3 * _gemm_flops(b_tiles * mem.block_b, lay.fa + lay.fb, mem.n_pad)  # 3xTF32
    nbytes = ((lay.B + lay.N) * lay.d_k + lay.N * (lay.fa + lay.fb) + lay.B * (lay.fa + lay.fb)) * F32
    if save_stats:
        nbytes += (2 * lay.B * lay.N + lay.B + lay.N) * F32
    return Kernel("_mira_mix_fwd_kernel", nbytes, {"tf32": score_flops + mix_flops}, b_tiles * split)


def _shrink(lay: Layer, name: str, width: int, j: int, slices: int, reads_bytes: float, factor_bytes: float) -> Kernel:
    import torch

    j_pad = configs.padded(j)
    row = configs.row_config(j_pad, torch.float32)
    spt = _samples_per_tile(lay, row.block_m)
    flops = 3 * _gemm_flops(lay.M, j_pad * slices, width) * spt  # 3xTF32
    nbytes = reads_bytes + factor_bytes + lay.M * lay.S * lay.r * F32
    return Kernel(name, nbytes, {"tf32": flops}, math.ceil(lay.M / row.block_m) * slices)


def _gemm_with_expand(lay: Layer, name: str, m, n, k, in_bytes, out_bytes, expand_cols, lora_bytes) -> Kernel:
    import torch

    cfg = configs.gemm_config(m, n, k, torch.bfloat16)
    spt = _samples_per_tile(lay, cfg.block_m)
    r_chunks = math.ceil(lay.r / configs.MIN_DOT) * configs.MIN_DOT
    flops = {"bf16": _gemm_flops(m, n, k), "tf32": _gemm_flops(m, expand_cols, r_chunks) * spt}
    programs = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    return Kernel(name, in_bytes + out_bytes + lora_bytes, flops, programs)


def triton_forward(lay: Layer, hw: Hardware) -> Variant:
    xb = lay.x_bytes
    mix = _mix(lay, hw, save_stats=False)
    shrink = _shrink(lay, "_mira_shrink_fwd_kernel", lay.d, lay.S * lay.r, 1, lay.M * lay.d * xb,
                     lay.B * lay.fa * F32)
    gemm = _gemm_with_expand(
        lay, "_mira_linear_fwd_kernel (GEMM + expand)", lay.M, lay.d_out, lay.d,
        lay.M * lay.d * xb + lay.d * lay.d_out * xb + lay.d_out * xb, lay.M * lay.d_out * xb,
        lay.S * lay.d_s, lay.M * lay.S * lay.r * F32 + lay.B * lay.fb * F32,
    )
    kernels = [mix, shrink, gemm]
    return Variant("MIRA, Triton (fused)", kernels, hw.custom_op + len(kernels) * hw.triton_launch)


def triton_backward(lay: Layer, hw: Hardware) -> Variant:
    """Consolidation step: dx, dquery, dkeys; banks frozen (output_mask x, q, k)."""
    import torch

    xb = lay.x_bytes
    g_slices = lay.M * lay.S * lay.d_s * xb
    mix = _mix(lay, hw, save_stats=True)
    shrink = _shrink(lay, "_mira_shrink_fwd_kernel (h)", lay.d, lay.S * lay.r, 1, lay.M * lay.d * xb,
                     lay.B * lay.fa * F32)
    shrink_g = _shrink(lay, "_mira_shrink_fwd_kernel (dh = G B)", lay.d_s, lay.r, lay.S, g_slices,
                       lay.B * lay.fb * F32)
    dx = _gemm_with_expand(
        lay, "_mira_linear_fwd_kernel (dx = G W + dh A)", lay.M, lay.d, lay.d_out,
        lay.M * lay.d_out * xb + lay.d * lay.d_out * xb, lay.M * lay.d * xb, lay.S * lay.d,
        lay.M * lay.S * lay.r * F32 + lay.B * lay.fa * F32,
    )
    fb = configs.factor_config(configs.padded(lay.r), torch.float32)
    fa = configs.factor_config(configs.padded(lay.S * lay.r), torch.float32)
    factor_b = Kernel("_mira_factor_bwd_kernel (dB)", g_slices + lay.M * lay.S * lay.r * F32 + lay.B * lay.fb * F32,
                      {"tf32": 3 * _gemm_flops(lay.M, configs.padded(lay.r), lay.S * lay.d_s)},
                      lay.B * lay.S * math.ceil(lay.d_s / fb.block_m))
    factor_a = Kernel("_mira_factor_bwd_kernel (dA)", lay.M * lay.d * xb + lay.M * lay.S * lay.r * F32
                      + lay.B * lay.fa * F32, {"tf32": 3 * _gemm_flops(lay.M, configs.padded(lay.S * lay.r), lay.d)},
                      lay.B * math.ceil(lay.d / fa.block_m))
    mem = configs.memory_config(lay.N, torch.float32)
    b_tiles = math.ceil(lay.B / mem.block_b)
    b_pad = b_tiles * mem.block_b
    split = configs.split_for(b_tiles, math.ceil(max(lay.fa, lay.fb) / mem.block_f))
    dw = Kernel("_mira_dw_bwd_kernel (partial dw)", (lay.B * (lay.fa + lay.fb) + lay.N * (lay.fa + lay.fb)
                                                     + split * lay.B * lay.N) * F32,
                {"tf32": 3 * _gemm_flops(b_pad, mem.n_pad, lay.fa + lay.fb)}, b_tiles * split)
    k_chunks = math.ceil(lay.d_k / mem.grad_k)
    scores = Kernel("_mira_scores_bwd_kernel (dz, dquery)", ((split + 4) * lay.B * lay.N + lay.N * lay.d_k
                                                             + 2 * lay.B * lay.d_k) * F32,
                    {"tf32": 3 * _gemm_flops(b_pad, lay.d_k, mem.n_pad)}, b_tiles * k_chunks)
    n_pad16 = math.ceil(lay.N / 16) * 16
    keys = Kernel("_mira_keys_bwd_kernel (dkeys)", (2 * lay.B * lay.N * math.ceil(lay.d_k / mem.grad_k)
                                                    + lay.B * lay.d_k * math.ceil(lay.N / 16)
                                                    + 2 * lay.N * lay.d_k) * F32,
                  {"tf32": 3 * _gemm_flops(n_pad16, lay.d_k, b_pad)},
                  math.ceil(lay.N / 16) * math.ceil(lay.d_k / mem.grad_k))
    kernels = [mix, shrink, shrink_g, dx, factor_b, factor_a, dw, scores, keys]
    return Variant("MIRA, Triton (fused) backward", kernels, hw.custom_op_autograd + len(kernels) * hw.triton_launch)


# --------------------------------------------------------------------------------------------
# cuBLAS + unfused LoRA: what a straightforward PyTorch implementation launches.
# --------------------------------------------------------------------------------------------


def _small(name: str, nbytes: float, flops: float = 0.0) -> Kernel:
    return Kernel(name, nbytes, {"fp32": flops} if flops else {})


def unfused_forward(lay: Layer, hw: Hardware) -> Variant:
    """F.linear + retrieval in fp32 + mixing + bmm shrink/expand in x's dtype + slice adds.

    The adapter path here runs in bf16 after the mixing (cheaper than the spec's fp32, so the
    baseline is favoured); K's slice gets no zero block (Q and V are added into their slices).
    """
    xb = lay.x_bytes
    B, N, dk = lay.B, lay.N, lay.d_k
    ks = [
        _small("normalize(q): norm", B * dk * F32), _small("normalize(q): div", 2 * B * dk * F32),
        _small("normalize(K): norm", N * dk * F32), _small("normalize(K): div", 2 * N * dk * F32),
        Kernel("scores q K^T (cuBLAS)", (B + N) * dk * F32 + B * N * F32, {"fp32": _gemm_flops(B, N, dk)}),
        _small("affine: sum", B * N * F32), _small("affine: guard (where)", 2 * B * F32),
        _small("affine: divide", 2 * B * N * F32),
        Kernel("mix A: w @ bank_a (cuBLAS)", (N * lay.fa + B * lay.fa) * F32, {"fp32": _gemm_flops(B, lay.fa, N)}),
        Kernel("mix B: w @ bank_b (cuBLAS)", (N * lay.fb + B * lay.fb) * F32, {"fp32": _gemm_flops(B, lay.fb, N)}),
        _small("mixed A to bf16", B * lay.fa * (F32 + xb)), _small("mixed B to bf16", B * lay.fb * (F32 + xb)),
        plain_forward(lay, hw).kernels[0],
        Kernel("shrink: bmm x A^T", lay.M * lay.d * xb + B * lay.fa * xb + lay.M * lay.S * lay.r * xb,
               {"bf16": _gemm_flops(lay.M, lay.S * lay.r, lay.d)}),
    ]
    for s in range(lay.S):
        ks.append(Kernel(f"expand slice {s}: bmm h B^T", lay.M * lay.r * xb + B * lay.fb // lay.S * xb
                         + lay.M * lay.d_s * xb, {"bf16": _gemm_flops(lay.M, lay.d_s, lay.r)}))
        ks.append(_small(f"y[..., slice {s}] += scale * delta", 3 * lay.M * lay.d_s * xb, lay.M * lay.d_s * 2))
    return Variant("MIRA, cuBLAS + unfused LoRA", ks, len(ks) * hw.aten_op)


def unfused_backward(lay: Layer, hw: Hardware) -> Variant:
    """Autograd through :func:`unfused_forward` for dx, dquery, dkeys (banks frozen)."""
    xb = lay.x_bytes
    B, N, dk, M = lay.B, lay.N, lay.d_k, lay.M
    ks = []
    for s in range(lay.S):
        ks.append(_small(f"grad of slice add {s}: copy G slice", 2 * M * lay.d_s * xb))
        ks.append(Kernel(f"expand {s} backward: dh = G B", M * lay.d_s * xb + B * lay.fb // lay.S * xb + M * lay.r * xb,
                         {"bf16": _gemm_flops(M, lay.r, lay.d_s)}))
        ks.append(Kernel(f"expand {s} backward: dB = G^T h", M * lay.d_s * xb + M * lay.r * xb
                         + B * lay.fb // lay.S * xb, {"bf16": _gemm_flops(lay.d_s, lay.r, M)}))
    ks += [
        _small("stack dh", 2 * M * lay.S * lay.r * xb),
        Kernel("shrink backward: dx_lora = dh A", M * lay.S * lay.r * xb + B * lay.fa * xb + M * lay.d * xb,
               {"bf16": _gemm_flops(M, lay.d, lay.S * lay.r)}),
        Kernel("shrink backward: dA = dh^T x", M * lay.S * lay.r * xb + M * lay.d * xb + B * lay.fa * xb,
               {"bf16": _gemm_flops(lay.S * lay.r, lay.d, M)}),
        plain_backward(lay, hw).kernels[0],
        _small("dx = dx_base + dx_lora", 3 * M * lay.d * xb, M * lay.d),
        _small("dA to fp32", B * lay.fa * (xb + F32)), _small("dB to fp32", B * lay.fb * (xb + F32)),
        Kernel("dw from dA (cuBLAS)", (B * lay.fa + N * lay.fa + B * N) * F32, {"fp32": _gemm_flops(B, N, lay.fa)}),
        Kernel("dw from dB (cuBLAS)", (B * lay.fb + N * lay.fb + B * N) * F32, {"fp32": _gemm_flops(B, N, lay.fb)}),
        _small("dw sum", 3 * B * N * F32),
    ]
    ks += [_small(f"affine backward {i}", 3 * B * N * F32) for i in range(4)]
    ks += [
        Kernel("scores backward: d(qn) (cuBLAS)", (B * N + N * dk + B * dk) * F32, {"fp32": _gemm_flops(B, dk, N)}),
        Kernel("scores backward: d(kn) (cuBLAS)", (B * N + B * dk + N * dk) * F32, {"fp32": _gemm_flops(N, dk, B)}),
    ]
    ks += [_small(f"normalize(q) backward {i}", 3 * B * dk * F32) for i in range(4)]
    ks += [_small(f"normalize(K) backward {i}", 3 * N * dk * F32) for i in range(4)]
    n_forward_nodes = len(unfused_forward(lay, hw).kernels)
    return Variant("MIRA, cuBLAS + unfused LoRA backward", ks, len(ks) * hw.aten_op + n_forward_nodes
                   * hw.autograd_node)


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

CONFIGS = ((4, 30), (16, 30), (64, 256))  # (r, N): the paper's setting first
BATCHES = (1, 8, 64, 256)


def _us(t: float) -> str:
    return f"{t * 1e6:9.2f}"


def kernel_table(variant: Variant, hw: Hardware) -> list[str]:
    lines = [f"  {variant.name}: {len(variant.kernels)} kernels, host {variant.host * 1e6:.1f} us (eager)"]
    lines.append(f"    {'kernel':<46} {'GFLOP':>9} {'MB':>9} {'roofline us':>11}  bound")
    for k in variant.kernels:
        lines.append(f"    {k.name:<46} {k.total_flops / 1e9:9.4f} {k.bytes / 1e6:9.3f} {k.time(hw) * 1e6:11.2f}  "
                     f"{k.bound(hw)}")
    total_f = sum(k.total_flops for k in variant.kernels)
    total_b = sum(k.bytes for k in variant.kernels)
    roof = sum(k.time(hw) for k in variant.kernels)
    lines.append(f"    {'total':<46} {total_f / 1e9:9.4f} {total_b / 1e6:9.3f} {roof * 1e6:11.2f}  "
                 f"(+ {len(variant.kernels)} x {hw.kernel_gap * 1e6:.1f} us kernel gaps)")
    return lines


def summary_rows(hw: Hardware, training: bool) -> list[str]:
    head = (f"{'r':>3} {'N':>4} {'B':>4} | {'plain eager':>11} {'graph':>9} | {'Triton eager':>12} {'ovh':>8} "
            f"{'graph':>9} {'ovh':>8} | {'unfused eager':>13} {'ovh':>8} {'graph':>9} {'ovh':>8}")
    lines = [head, "-" * len(head)]
    for r, n in CONFIGS:
        for b in BATCHES:
            lay = Layer(B=b, r=r, N=n)
            if training:
                plain = _sum(plain_forward(lay, hw), plain_backward(lay, hw))
                fused = _sum(triton_forward(lay, hw), triton_backward(lay, hw))
                unfused = _sum(unfused_forward(lay, hw), unfused_backward(lay, hw))
            else:
                plain, fused, unfused = plain_forward(lay, hw), triton_forward(lay, hw), unfused_forward(lay, hw)
            pe, pg = plain.eager(hw), plain.graph(hw)
            cells = [f"{r:>3} {n:>4} {b:>4} | {_us(pe):>11} {_us(pg)} |"]
            for v, w in ((fused, 12), (unfused, 13)):
                e, g = v.eager(hw), v.graph(hw)
                cells.append(f" {_us(e):>{w}} {100 * (e / pe - 1):7.1f}% {_us(g)} {100 * (g / pg - 1):7.1f}% |")
            lines.append("".join(cells).rstrip(" |"))
    return lines


def _sum(a: Variant, b: Variant) -> Variant:
    return Variant(f"{a.name} + backward", a.kernels + b.kernels, a.host + b.host)


def report(hw: Hardware, detail_all: bool = False) -> str:
    out = [
        "MODEL, NOT A MEASUREMENT: MIRA on the ViT-B/16 qkv projection (T=197, d=768 -> 2304, Q and V adapted),",
        f"bf16 activations, {hw.name}: HBM {hw.hbm / 1e12:.2f} TB/s, dense bf16 {hw.bf16 / 1e12:.0f} TFLOP/s, "
        f"TF32 {hw.tf32 / 1e12:.0f}, FP32 {hw.fp32 / 1e12:.0f}, L2 {hw.l2 / 1e6:.0f} MB.",
        f"Device: each kernel at its roofline + {hw.kernel_gap * 1e6:.1f} us gap. Host (eager): ATen op "
        f"{hw.aten_op * 1e6:.0f} us, autograd node {hw.autograd_node * 1e6:.0f} us, MIRA custom op "
        f"{hw.custom_op * 1e6:.0f} us (+{hw.custom_op_autograd * 1e6:.0f} us with autograd), Triton launch "
        f"{hw.triton_launch * 1e6:.0f} us.",
        "Eager time = max(host, device); graph time (CUDA graph / torch.compile reduce-overhead) = device.",
        "Overheads are relative to the plain qkv F.linear (forward) or F.linear + its dx GEMM (training).",
        "",
        "== Modelled overhead over the plain qkv GEMM, inference (forward), times in us ==",
        *summary_rows(hw, training=False),
        "",
        "== Modelled overhead over the plain qkv GEMM, training step (forward + backward: dx, dquery, dkeys) ==",
        *summary_rows(hw, training=True),
        "",
        "== Bytes and FLOPs per kernel (roofline each) ==",
    ]
    for r, n in CONFIGS:
        for b in BATCHES:
            lay = Layer(B=b, r=r, N=n)
            out.append(f"-- r={r} N={n} B={b} (M = B*T = {lay.M})")
            out += kernel_table(plain_forward(lay, hw), hw)
            out += kernel_table(triton_forward(lay, hw), hw)
            out += kernel_table(triton_backward(lay, hw), hw)
            if detail_all or (r, n) == CONFIGS[0]:
                out += kernel_table(unfused_forward(lay, hw), hw)
                out += kernel_table(unfused_backward(lay, hw), hw)
            else:
                for v in (unfused_forward(lay, hw), unfused_backward(lay, hw)):
                    out.append(f"  {v.name}: {len(v.kernels)} kernels, "
                               f"{sum(k.total_flops for k in v.kernels) / 1e9:.4f} GFLOP, "
                               f"{sum(k.bytes for k in v.kernels) / 1e6:.3f} MB, roofline "
                               f"{sum(k.time(hw) for k in v.kernels) * 1e6:.2f} us, host {v.host * 1e6:.1f} us")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Performance MODEL of the MIRA Triton kernels (H100).")
    parser.add_argument("--triton-launch-us", type=float, default=Hardware.triton_launch * 1e6)
    parser.add_argument("--aten-op-us", type=float, default=Hardware.aten_op * 1e6)
    parser.add_argument("--kernel-gap-us", type=float, default=Hardware.kernel_gap * 1e6)
    parser.add_argument("--all-kernels", action="store_true", help="list the unfused kernels for every config")
    args = parser.parse_args(argv)
    hw = Hardware(triton_launch=args.triton_launch_us * 1e-6, aten_op=args.aten_op_us * 1e-6,
                  kernel_gap=args.kernel_gap_us * 1e-6)
    print(report(hw, detail_all=args.all_kernels))


if __name__ == "__main__":
    main()
