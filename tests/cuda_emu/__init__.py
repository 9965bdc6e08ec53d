"""Host-side harness of the CUDA kernels' SIMT emulation: builds tests/cuda_emu/driver.cpp with g++ and runs it.

The driver is a separate program (never loaded into the pytest process): it reads one case file,
runs the exact kernel source of ``csrc/cuda/mira_kernels.cuh`` with every CUDA thread of a block
as a ``std::thread``, and writes the results. :func:`run_forward` / :func:`run_backward` do in
Python what ``csrc/cuda/mira_cuda.cu`` does with ATen (base GEMMs, dtype conversions), so the
result is what the CUDA backend would return.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mira_kernels import reference

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = Path(__file__).resolve().parent
KERNEL_HEADER = ROOT / "csrc" / "cuda" / "mira_kernels.cuh"
SOURCES = (KERNEL_HEADER, EMU_DIR / "simt_emu.h", EMU_DIR / "driver.cpp")
BUILD_DIR = ROOT / "build" / "cuda_emu"  # gitignored
CXX_FLAGS = ("-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
             "-fno-omit-frame-pointer")
SANITIZERS = {
    # Out-of-bounds reads/writes of global or dynamic shared memory, undefined behaviour: abort the run.
    "address": ("-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
    # Data races between the threads of a block (a missing __syncthreads): reported, exit code 66.
    "thread": ("-fsanitize=thread",),
}
SANITIZER_ENV = {
    "address": {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"},
    "thread": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66"},
}
TIMEOUT_S = 300  # generous for loaded CI machines; a deadlocked barrier must still fail, not hang

_MAGIC = 0x4D495241454D55
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SEP_CODE = {name: i for i, name in enumerate(reference.SEPARATIONS)}
SMEM_BUDGET = 32 * 1024  # mira_cuda::kSmemBudget, what the CUDA glue passes


def build_driver(sanitizer: str = "address") -> Path:
    """Compiles the driver once per content of its sources and flags; returns the binary's path.

    ``sanitizer``: ``address`` (ASan + UBSan) or ``thread`` (TSan).
    """
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the CUDA emulation needs a C++20 compiler; {cxx!r} was not found")
    flags = (*CXX_FLAGS, *SANITIZERS[sanitizer])
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(path.read_bytes())
    digest.update(" ".join((cxx, *flags)).encode())
    binary = BUILD_DIR / f"driver-{sanitizer}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=BUILD_DIR, prefix=".driver-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [cxx, *flags, f"-I{ROOT / 'csrc'}", f"-I{EMU_DIR}", str(EMU_DIR / "driver.cpp"), "-o", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"building the emulation driver failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp_path, binary)  # atomic: concurrent test runs never see a half-written binary
    return binary


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_raw(buf: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    raw_dtype = torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype
    t = torch.frombuffer(bytearray(buf), dtype=raw_dtype, count=count)
    return t.view(dtype).clone()


def acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Launch:
    """One launch as the host plan issued it: kernel name, blocks (1-D grid), dynamic shared memory in bytes."""

    kernel: str
    blocks: int
    smem: int


@dataclass
class EmuRun:
    outputs: tuple
    launches: int
    blocks: int
    spill: bool
    plan: tuple[Launch, ...] = ()
    workspace: int = 0


def _parse_report(stdout: str) -> tuple[dict, tuple[Launch, ...]]:
    lines = stdout.splitlines()
    stats = {k: int(v) for k, v in (kv.split("=") for kv in lines[0].split())}
    plan = []
    for line in lines[1:]:
        tag, kernel, blocks, smem = line.split()
        assert tag == "launch", line
        plan.append(Launch(kernel, int(blocks), int(smem)))
    return stats, tuple(plan)


def _run(binary: Path, header: list[int], offsets, scale: float, eps: float, tensors: list[torch.Tensor],
         outputs: list[tuple[torch.dtype, int]]) -> tuple[list[torch.Tensor], dict, tuple[Launch, ...]]:
    assert len(header) == 25
    blob = struct.pack("<25q", *header) + struct.pack(f"<{len(offsets)}q", *offsets) + struct.pack("<2d", scale, eps)
    blob += b"".join(_raw(t) for t in tensors)
    with tempfile.TemporaryDirectory(prefix="mira-emu-") as tmp:
        case, result = Path(tmp) / "case.bin", Path(tmp) / "result.bin"
        case.write_bytes(blob)
        env = dict(os.environ, **SANITIZER_ENV["thread" if "-thread-" in binary.name else "address"])
        proc = subprocess.run([str(binary), str(case), str(result)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env)
        if proc.returncode != 0:
            tail = proc.stderr[-4000:]
            raise AssertionError(f"emulated kernels failed (exit {proc.returncode}):\n{proc.stdout}\n{tail}")
        data = result.read_bytes()
    got, at = [], 0
    for dtype, count in outputs:
        size = count * torch.empty(0, dtype=dtype).element_size()
        got.append(_from_raw(data[at : at + size], dtype, count))
        at += size
    assert at == len(data), f"driver wrote {len(data)} bytes, expected {at}"
    stats, plan = _parse_report(proc.stdout)
    return got, stats, plan


def _header(mode, x, keys, bank_a, bank_b, separation, mask, smem_budget, io, out_is_x=False):
    B, T, d_in = x.shape
    N, d_k = keys.shape
    _, S, r, _ = bank_a.shape
    d_s = bank_b.shape[2]
    io_storage_len = io.untyped_storage().nbytes() // io.element_size()
    return [
        _MAGIC, _DTYPE_CODE[x.dtype], mode, B, T, d_in, N, d_k, S, r, d_s, _SEP_CODE[separation], *map(int, mask),
        smem_budget, io_storage_len, *io.stride(), 0, io.storage_offset(), int(out_is_x),
    ]


def _whole_storage(t: torch.Tensor) -> torch.Tensor:
    # The tensor's entire storage as a flat view (what the kernels index into through the data pointer).
    return torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


class PlanError(RuntimeError):
    """The host plan refused the problem (a CUDA launch limit), with the glue's reason."""


def plan_launches(binary: Path, *, backward: bool, dtype: torch.dtype, B: int, T: int, d_in: int, N: int, d_k: int,
                  S: int, r: int, d_s: int, slice_offsets=None, separation: str = "affine",
                  output_mask=(True,) * 5, smem_budget: int = SMEM_BUDGET) -> EmuRun:
    """The launches the CUDA backend's host plan issues for these sizes, without data or execution.

    Any size works (nothing is allocated): this is how the Python launch plan (mira_kernels.cuda_plan) is
    checked against the C++ one at ViT sizes. Raises PlanError when the plan exceeds a launch limit.
    """
    offsets = list(slice_offsets) if slice_offsets is not None else [s * d_s for s in range(S)]
    mask = tuple(output_mask) if backward else (False,) * 5
    header = [_MAGIC, _DTYPE_CODE[dtype], int(backward), B, T, d_in, N, d_k, S, r, d_s, _SEP_CODE[separation],
              *map(int, mask), smem_budget, 0, 0, 0, 0, 1, 0, 0]
    blob = struct.pack("<25q", *header) + struct.pack(f"<{S}q", *offsets) + struct.pack("<2d", 1.0, 0.01)
    with tempfile.TemporaryDirectory(prefix="mira-emu-") as tmp:
        case = Path(tmp) / "case.bin"
        case.write_bytes(blob)
        env = dict(os.environ, **SANITIZER_ENV["address"])
        proc = subprocess.run([str(binary), str(case), str(Path(tmp) / "unused.bin")], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env)
    if proc.returncode == 3:
        raise PlanError(proc.stderr.strip())
    if proc.returncode != 0:
        raise AssertionError(f"plan-only driver run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    stats, plan = _parse_report(proc.stdout)
    return EmuRun((), stats["launches"], 0, bool(stats["spill"]), plan, stats["workspace"])


def _memory(query, keys, bank_a, bank_b, ct):
    return [t.detach().to(ct).contiguous() for t in (query, keys, bank_a, bank_b)]


def run_forward(binary, x, weight, bias, query, keys, bank_a, bank_b, *, slice_offsets, separation="affine",
                scale=1.0, eps=reference.DEFAULT_EPS, out=None, smem_budget=SMEM_BUDGET, base=None) -> EmuRun:
    """The CUDA backend's mira_linear, emulated: y = F.linear (as at::linear) then the adapter kernels in place.

    ``out``: optional (B, T, d_out) view (any strides and storage offset) to receive y, as mira_adapter_'s out.
    ``base``: the base GEMM's result to use instead of computing it. A test of the kernels' own bits passes rows
    of one batched GEMM: the host BLAS is not batch invariant (its kernel, and so whether it fuses the bias add
    into an FMA, can depend on the row count and the CPU), and those bits are not the kernels' to keep.
    """
    base = F.linear(x, weight, bias) if base is None else base
    if out is None:
        out = base.clone()
    else:
        out.copy_(base)
    storage = _whole_storage(out)
    ct = acc_dtype(x.dtype)
    header = _header(0, x, keys, bank_a, bank_b, separation, (0,) * 5, smem_budget, out)
    (flat,), stats, plan = _run(binary, header, slice_offsets, scale, eps,
                                [storage, x, *_memory(query, keys, bank_a, bank_b, ct)], [(x.dtype, storage.numel())])
    storage.copy_(flat)
    return EmuRun((out,), stats["launches"], stats["blocks"], bool(stats["spill"]), plan, stats["workspace"])


def run_adapter_into_x(binary, x, query, keys, bank_a, bank_b, *, slice_offsets, separation="affine", scale=1.0,
                       eps=reference.DEFAULT_EPS, smem_budget=SMEM_BUDGET) -> EmuRun:
    """The CUDA backend's ``mira_adapter_(x, x, ...)``, emulated: out is x itself (d_out = d_in), the one alias
    the contract allows. The glue passes one pointer for both (``x.contiguous()`` is x), and so does the driver:
    the kernels read and write the same buffer. Returns x's new value (the argument is left unchanged).
    """
    x = x.detach().contiguous()
    ct = acc_dtype(x.dtype)
    header = _header(0, x, keys, bank_a, bank_b, separation, (0,) * 5, smem_budget, x, out_is_x=True)
    (flat,), stats, plan = _run(binary, header, slice_offsets, scale, eps,
                                [x, *_memory(query, keys, bank_a, bank_b, ct)], [(x.dtype, x.numel())])
    return EmuRun((flat.view(x.shape),), stats["launches"], stats["blocks"], bool(stats["spill"]), plan,
                  stats["workspace"])


def run_backward(binary, grad_out, x, weight, query, keys, bank_a, bank_b, *, slice_offsets, separation="affine",
                 scale=1.0, eps=reference.DEFAULT_EPS, output_mask=(True,) * 5, smem_budget=SMEM_BUDGET) -> EmuRun:
    """The CUDA backend's mira_linear_backward, emulated: (dx, dquery, dkeys, dbank_a, dbank_b), None where not asked.

    ``grad_out`` may be any strided view, with any storage offset.
    """
    need_x, need_q, need_k, need_a, need_b = output_mask
    ct = acc_dtype(x.dtype)
    storage = _whole_storage(grad_out)
    header = _header(1, x, keys, bank_a, bank_b, separation, output_mask, smem_budget, grad_out)
    tensors = [storage, x]
    if need_x:
        tensors.append(grad_out @ weight)  # at::matmul in x's dtype
    tensors += _memory(query, keys, bank_a, bank_b, ct)
    B, T, d_in = x.shape
    shapes = [
        (need_x, x.dtype, x.shape), (need_q, ct, query.shape), (need_k, ct, keys.shape),
        (need_a, ct, bank_a.shape), (need_b, ct, bank_b.shape),
    ]
    outputs = [(dtype, int(torch.Size(shape).numel()) if need else 0) for need, dtype, shape in shapes]
    got, stats, plan = _run(binary, header, slice_offsets, scale, eps, tensors, outputs)
    like = (x, query, keys, bank_a, bank_b)
    grads = tuple(
        g.view(shape).to(src.dtype) if need else None for g, (need, _, shape), src in zip(got, shapes, like)
    )
    return EmuRun(grads, stats["launches"], stats["blocks"], bool(stats["spill"]), plan, stats["workspace"])
