"""What a plain Triton GEMM reaches on Hopper at the qkv shape: the question issue 17's design hangs on.

The fused Triton projection (``_mira_gemm_kernel``) measured 1.5x cuBLAS at B = 64 on an H200, and
the same kernel with no adapter was no faster: the gap is its base GEMM, not the adapter. Whether
the fused forward can get within the 0.4% budget in Triton at all depends on whether *any* Triton
GEMM gets near cuBLAS at M = 197 B, N = 2304, K = 768 in bf16. This module is that probe: the
textbook Hopper design, and nothing of MIRA's in it, so that it isolates the question.

- Operands through TMA tensor descriptors (host-made ``TensorDescriptor``): x (M, K) and W (N, K)
  tiles land in shared memory by the copy engine, out-of-bounds rows and columns zero-filled, the
  output tile stored the same way and clipped at the edges; no address arithmetic, no masks in the
  main loop (the fused kernel walks block pointers with boundary checks, which Triton 3.x lowers to
  masked loads).
- Persistent: ``programs`` (the device's SM count by default) programs walk the output tiles,
  GROUP_M row tiles at a time so that they share the column tiles' W panels in L2. Each tile is
  computed whole by one program in one K order, so the bits do not depend on the SM count.
- ``y = x W^T + bias``, the bias added to the fp32 accumulator and the sum rounded once, as
  cuBLASLt's bias epilogue (``F.linear``) does.
- No warp specialisation: with Triton 3.8, ``tl.range(..., warp_specialize=True)`` on the tile loop
  compiles for sm_90 to the same kernel as without it (same registers and shared memory at both
  configurations, no ``setmaxnreg`` in the PTX; checked ahead of time 2026-12-07), so producer /
  consumer warpgroups, which cuBLAS's Hopper kernels use, are out of this probe's reach.

``make gpu-check`` times it (``probe[...]`` rows of the op phase, bf16 forward on sm_90 and newer)
against ``F.linear`` in the same rounds: if it is near cuBLAS, the fused forward should be rebuilt on
this skeleton (shrink in the main loop, expand in the epilogue); if it is not, the base GEMM has to
be cuBLAS's, and the adapter has to live outside it. Without a GPU: ``python -m benchmarks.gemm_probe
--lower 90`` compiles every configuration for sm_90 (registers, spills, shared memory, wgmma), and
``TRITON_INTERPRET=1 python -m benchmarks.gemm_probe --check`` runs the kernel under the interpreter
against ``F.linear`` (float32: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["ProbeConfig", "CONFIGS", "unavailable_reason", "linear", "lower", "check_interpreter", "main"]


@dataclass(frozen=True)
class ProbeConfig:
    """One tile configuration of the probe GEMM."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}s{self.num_stages}"

    def ring_bytes(self, element_size: int) -> int:
        """Shared memory of the operand ring: num_stages x and W tiles in flight."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * element_size


#: The two tilings public Hopper bf16 GEMMs use at this size: a 128 x 256 tile (one warpgroup
#: pair, three stages: 209 KiB of shared memory compiled, of the 227 KiB an sm_90 block may have)
#: and 128 x 128 with four (160 KiB).
CONFIGS = (
    ProbeConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    ProbeConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
)


def _kernel():
    """The Triton kernel, made on first use (importing this module needs no Triton)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _linear_tma_kernel(x_desc, w_desc, y_desc, bias_ptr, M, N, K, programs,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
            m_tiles = tl.cdiv(M, BLOCK_M)
            n_tiles = tl.cdiv(N, BLOCK_N)
            per_group = GROUP_M * n_tiles
            for tile in tl.range(tl.program_id(0), m_tiles * n_tiles, programs, flatten=True):
                first = tile // per_group * GROUP_M
                rows_in_group = tl.minimum(m_tiles - first, GROUP_M)
                m0 = (first + (tile % per_group) % rows_in_group) * BLOCK_M
                n0 = (tile % per_group) // rows_in_group * BLOCK_N
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    a = x_desc.load([m0, k0])
                    w = w_desc.load([n0, k0])
                    acc = tl.dot(a, w.T, acc)
                if HAS_BIAS:
                    cols = n0 + tl.arange(0, BLOCK_N)
                    acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                y_desc.store([m0, n0], acc.to(y_desc.dtype))

        _KERNEL = _linear_tma_kernel
    return _KERNEL


_KERNEL = None


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the probe can run on ``device``, else why not (TMA needs sm_90)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"TMA descriptors need a CUDA device, not {device.type}"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError as exc:
        return f"this Triton has no host tensor descriptors: {exc}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"TMA needs sm_90 or newer, not sm_{major}x"
    return None


def _launch_args(x2, weight, bias, y, config: ProbeConfig, programs: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    c = config
    descs = (TensorDescriptor.from_tensor(x2, [c.block_m, c.block_k]),
             TensorDescriptor.from_tensor(weight, [c.block_n, c.block_k]),
             TensorDescriptor.from_tensor(y, [c.block_m, c.block_n]))
    M, K = x2.shape
    args = (*descs, bias if bias is not None else y, M, weight.shape[0], K, programs)
    constexprs = dict(HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                      GROUP_M=c.group_m)
    return args, constexprs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: ProbeConfig = CONFIGS[0],
           programs: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the probe kernel. x (..., K) with rows of unit stride, weight
    (N, K) and bias (N,) contiguous, all one dtype; TMA wants 16-byte-aligned bases and row strides.
    ``programs``: persistent programs (default: the device's SM count; on a CPU, one per tile)."""
    import triton

    if x.stride(-1) != 1 or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        raise ValueError("the probe reads x's rows, weight and bias as contiguous")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"one dtype for all operands, got x {x.dtype}, weight {weight.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    M, N = x2.shape[0], weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else tiles
    programs = max(1, min(programs, tiles))
    args, constexprs = _launch_args(x2, weight, bias, y, config, programs)
    _kernel()[(programs,)](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
    return y.reshape(*x.shape[:-1], N)


def lower(arch: int = 90, dtype: torch.dtype = torch.bfloat16, batch: int = 64) -> list[dict]:
    """Compiles every configuration for ``sm_<arch>`` at the ViT-B/16 qkv shape, without a GPU.
    Returns per config: registers, stack and local bytes (spills), shared memory, whether the PTX
    has wgmma, and the shared memory the operand ring alone should take (its stages took effect
    if the kernel has at least that)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from mira_kernels.triton import lowering

    meta = dict(device="meta", dtype=dtype)
    x2, weight, bias = torch.empty(batch * 197, 768, **meta), torch.empty(2304, 768, **meta), torch.empty(2304, **meta)
    y = torch.empty(x2.shape[0], 2304, **meta)
    out = []
    for c in CONFIGS:
        args, constexprs = _launch_args(x2, weight, bias, y, c, programs=132)
        kernel = _kernel()
        names = [n for n in kernel.arg_names if n not in constexprs]
        signature = {n: mangle_type(a) for n, a in zip(names, args, strict=True)}
        signature.update({n: "constexpr" for n in constexprs})
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=c.num_warps, num_stages=c.num_stages))
        usage = lowering.resource_usage(compiled.asm["cubin"])
        out.append({"config": c.name, **asdict(c), "arch": arch, "dtype": str(dtype).removeprefix("torch."),
                    "registers": usage["REG"], "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
                    "shared": int(compiled.metadata.shared), "ring": c.ring_bytes(x2.element_size()),
                    "smem_limit": lowering.SMEM_LIMIT[arch], "wgmma": "wgmma.mma_async" in compiled.asm["ptx"]})
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def check_interpreter() -> list[dict]:
    """The kernel under ``TRITON_INTERPRET=1`` against ``F.linear`` in float32, at shapes that leave
    partial tiles in every dimension (small tiles: the interpreter is slow), with and without bias,
    from a row-strided x, and with fewer programs than tiles (the persistent walk)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    small = ProbeConfig(32, 32, 16, group_m=2, num_warps=4, num_stages=2)
    rows = []
    for M, N, K, with_bias, programs, strided in ((100, 72, 40, True, None, False), (37, 64, 32, False, 3, False),
                                                  (65, 40, 48, True, 2, True)):
        base = torch.randn(M, 2 * K if strided else K, generator=g)
        x = base[:, :K] if strided else base
        w = torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g) if with_bias else None
        got = linear(x, w, b, small, programs=programs)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        rows.append({"M": M, "N": N, "K": K, "bias": with_bias, "programs": programs, "strided_x": strided,
                     "rel_err": _rel_err(got, want), "pytorch_rel_err": _rel_err(F.linear(x, w, b), want)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lower", type=int, default=None, metavar="ARCH", help="compile every config for sm_ARCH")
    p.add_argument("--check", action="store_true", help="run under the Triton interpreter against F.linear")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.lower is None and not a.check:
        p.error("nothing to do: give --lower ARCH and/or --check (a GPU times it in make gpu-check)")
    doc = {}
    if a.check:
        doc["check"] = check_interpreter()
        for r in doc["check"]:
            print(f"interpreter, float32 M={r['M']} N={r['N']} K={r['K']} bias={r['bias']} programs={r['programs']} "
                  f"strided x={r['strided_x']}: rel err {r['rel_err']:.2e} (F.linear's {r['pytorch_rel_err']:.2e})")
    if a.lower is not None:
        doc["lower"] = lower(a.lower)
        for r in doc["lower"]:
            print(f"sm_{r['arch']} {r['dtype']} {r['config']}: {r['registers']} registers, stack {r['stack']}, "
                  f"local {r['local']}, shared {r['shared']} B (operand ring {r['ring']}, limit {r['smem_limit']}), "
                  f"wgmma {'yes' if r['wgmma'] else 'NO'}")
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
