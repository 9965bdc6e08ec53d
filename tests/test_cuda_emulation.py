"""The CUDA backend's kernels, executed on the CPU by the SIMT emulation, against the reference.

``csrc/cuda/mira_kernels.cuh`` (the exact source nvcc compiles) is built with g++ against
``tests/cuda_emu/simt_emu.h`` into a standalone driver (AddressSanitizer + UBSan), run once per case
in a subprocess (a second build with ThreadSanitizer checks for races). What the emulation can and cannot
catch is listed in ``tests/cuda_emu/README.md``.
Shapes are small and odd (the emulation runs 256 std::threads per block): T spans partial token
tiles, S*r spans partial register tiles, d_s and N exceed one block's stride.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from mira_kernels import reference
from mira_kernels.reference import SEPARATIONS
from tests.cuda_emu import build_driver, run_backward, run_forward
from tests.mira_inputs import assert_close_to_spec, make_inputs

# B, T (2 token tiles, the last partial), d_in, d_out, N, S (offsets out of order), r, d_s.
SHAPE = dict(B=2, T=11, d_in=13, d_out=24, N=5, S=2, r=3, d_s=7, offsets=[10, 0])
SCALE = 0.7


@pytest.fixture(scope="module")
def driver():
    return build_driver()


def _floor(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-6


def _kw(inp, separation):
    return dict(slice_offsets=inp.slice_offsets, separation=separation, scale=SCALE)


def check_forward(driver, inp, separation, *, out=None, smem_budget=None):
    extra = {} if smem_budget is None else {"smem_budget": smem_budget}
    run = run_forward(driver, *inp.linear_args(), out=out, **_kw(inp, separation), **extra)
    want = reference.mira_linear(*inp.to(torch.float64).linear_args(), **_kw(inp, separation))
    same = reference.mira_linear(*inp.linear_args(), **_kw(inp, separation))
    (got,) = run.outputs
    assert got.dtype == inp.x.dtype and got.shape == want.shape
    assert_close_to_spec(got, want, same, factor=2.0, floor=_floor(inp.x.dtype), what=f"forward {separation}")
    return run


def check_backward(driver, inp, separation, *, mask=(True,) * 5, grad_out=None, smem_budget=None, seed=1):
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        shape = (inp.x.shape[0], inp.x.shape[1], inp.weight.shape[0])
        grad_out = torch.randn(*shape, generator=g, dtype=torch.float64).to(inp.x.dtype)
    extra = {} if smem_budget is None else {"smem_budget": smem_budget}
    args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b)
    run = run_backward(driver, grad_out, *args, output_mask=mask, **_kw(inp, separation), **extra)
    args64 = tuple(t.double() for t in args)
    want = reference.mira_linear_backward(grad_out.double(), *args64, output_mask=mask, **_kw(inp, separation))
    same = reference.mira_linear_backward(grad_out.contiguous(), *args, output_mask=mask, **_kw(inp, separation))
    names = ("dx", "dquery", "dkeys", "dbank_a", "dbank_b")
    for name, need, got, w, s, src in zip(names, mask, run.outputs, want, same, args[:1] + args[2:]):
        if not need:
            assert got is None, f"{name} was not asked for"
            continue
        assert got.dtype == src.dtype and got.shape == src.shape, name
        assert_close_to_spec(got, w, s, factor=3.0, floor=_floor(inp.x.dtype), what=f"{name} ({separation})")
    return run


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_forward_every_separation_float64(driver, separation):
    run = check_forward(driver, make_inputs(**SHAPE, dtype=torch.float64), separation)
    assert run.launches == 2  # retrieval + apply; the base GEMM is ATen's


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_backward_every_separation_float64(driver, separation):
    run = check_backward(driver, make_inputs(**SHAPE, dtype=torch.float64), separation)
    assert run.launches == 5  # retrieval, tokens, factors, scores, memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("separation", ["affine", "softmax"])
def test_low_precision_within_pytorch_error(driver, dtype, separation):
    inp = make_inputs(**SHAPE, dtype=dtype)
    check_forward(driver, inp, separation)
    check_backward(driver, inp, separation)


def test_fp32_memory_with_bf16_x(driver):
    inp = make_inputs(**SHAPE, dtype=torch.float64).to(torch.bfloat16, memory_dtype=torch.float32)
    check_forward(driver, inp, "affine")
    check_backward(driver, inp, "affine")


@pytest.mark.parametrize("regime", ["one_slot", "uniform", "negative", "near_zero"])
def test_weight_regimes_float32(driver, regime):
    inp = make_inputs(**SHAPE, regime=regime, dtype=torch.float32)
    check_forward(driver, inp, "affine")
    check_backward(driver, inp, "affine")


EDGE_SHAPES = {
    "N=0": dict(B=2, T=3, d_in=5, d_out=8, N=0, S=1, r=2, d_s=8),
    "N=1": dict(B=2, T=8, d_in=5, d_out=8, N=1, S=1, r=2, d_s=8),  # T = one full token tile
    "r=1,S=1,B=1": dict(B=1, T=9, d_in=6, d_out=6, N=3, S=1, r=1, d_s=6),
    # S*r = 15 spans two register tiles; three slices out of order with gaps.
    "S=3,r=5": dict(B=2, T=4, d_in=9, d_out=30, N=4, S=3, r=5, d_s=6, offsets=[20, 0, 8]),
    # d_in > 2 lane strides, d_s > one block stride, T = 17: three tiles, the last with one token.
    "wide": dict(B=1, T=17, d_in=70, d_out=300, N=3, S=1, r=2, d_s=300),
}


@pytest.mark.parametrize("name", list(EDGE_SHAPES))
@pytest.mark.parametrize("separation", ["affine", "softmax"])
def test_edge_shapes_float64(driver, name, separation):
    inp = make_inputs(**EDGE_SHAPES[name], dtype=torch.float64)
    check_forward(driver, inp, separation)
    check_backward(driver, inp, separation)


@pytest.mark.parametrize("separation", ["affine", "softmax", "relu"])
def test_more_keys_than_one_score_pass_float64(driver, separation):
    # N = 300 > the 256 scores kept in shared memory: the retrieval streams the keys twice (once for
    # separations with row statistics). The backward emulates ~600 blocks, so it runs for one of them.
    inp = make_inputs(B=2, T=2, d_in=3, d_out=4, N=300, S=1, r=1, d_s=4, dtype=torch.float64)
    check_forward(driver, inp, separation)
    if separation == "softmax":
        check_backward(driver, inp, separation)


def test_empty_batch_and_empty_tokens(driver):
    run = check_forward(driver, make_inputs(B=0, T=3, d_in=5, d_out=8, N=2, S=1, r=2, d_s=8), "affine")
    assert run.launches == 0
    run = check_backward(driver, make_inputs(B=0, T=3, d_in=5, d_out=8, N=2, S=1, r=2, d_s=8), "affine")
    assert run.launches == 0
    inp = make_inputs(B=2, T=0, d_in=5, d_out=8, N=3, S=1, r=2, d_s=8)
    assert check_forward(driver, inp, "affine").launches == 1  # the retrieval only
    check_backward(driver, inp, "softmax")  # factor gradients are zero; dq still flows through nothing


def test_tile_rows_spilled_to_global_memory(driver):
    # The path taken when S*r is too large for the tile rows' shared memory, forced with a zero budget.
    inp = make_inputs(**SHAPE, dtype=torch.float64)
    assert check_forward(driver, inp, "affine", smem_budget=0).spill
    assert check_backward(driver, inp, "softmax", smem_budget=0).spill
    assert not check_forward(driver, inp, "affine").spill


def test_strided_out_and_grad(driver):
    inp = make_inputs(**SHAPE, dtype=torch.float32)
    B, T, d_out = SHAPE["B"], SHAPE["T"], SHAPE["d_out"]
    # (T, B, 2 * d_out) storage seen as (B, T, d_out) with every other column: no stride is 1.
    out = torch.zeros(T, B, 2 * d_out).permute(1, 0, 2)[..., ::2]
    assert out.stride() == (2 * d_out, B * 2 * d_out, 2)
    check_forward(driver, inp, "affine", out=out)
    grad = torch.randn(T, B, 2 * d_out).permute(1, 0, 2)[..., ::2]
    check_backward(driver, inp, "softmax", grad_out=grad)


@pytest.mark.parametrize(
    "mask, launches",
    [
        ((True, False, False, False, False), 2),  # dx only: retrieval + tokens
        ((False, True, False, False, False), 4),  # dquery: no memory kernel
        ((False, False, True, False, False), 5),
        ((False, False, False, False, True), 5),
        ((True, False, False, True, False), 5),
    ],
)
def test_only_requested_gradients(driver, mask, launches):
    inp = make_inputs(**SHAPE, dtype=torch.float64)
    assert check_backward(driver, inp, "tanh", mask=mask).launches == launches


@pytest.fixture(scope="module")
def tsan_driver():
    return build_driver("thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_intra_block_races_under_thread_sanitizer(tsan_driver, dtype):
    # Happens-before based: a shared-memory access pair between two threads of a block with no
    # __syncthreads between them is reported whatever the actual thread timing was.
    inp = make_inputs(**SHAPE, dtype=dtype)
    check_forward(tsan_driver, inp, "softmax")
    check_backward(tsan_driver, inp, "affine")
    check_backward(tsan_driver, inp, "tanh", smem_budget=0)  # tile rows in global memory


def _selftest(driver, mode, env):
    header = [0x4D495241454D55, 0, mode] + [1] * 21
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.bin"
        case.write_bytes(struct.pack("<24q", *header) + struct.pack("<q", 0) + struct.pack("<2d", 1.0, 0.01))
        return subprocess.run([str(driver), str(case), str(Path(tmp) / "out.bin")], capture_output=True, text=True,
                              timeout=120, env=env)


def test_emulation_catches_divergent_syncthreads(driver):
    proc = _selftest(driver, 2, {"ASAN_OPTIONS": "detect_leaks=0"})
    assert proc.returncode != 0 and "divergent __syncthreads" in proc.stderr, proc.stderr[-2000:]


def test_emulation_catches_shared_memory_overflow(driver):
    proc = _selftest(driver, 3, {"ASAN_OPTIONS": "detect_leaks=0"})
    assert proc.returncode != 0 and "AddressSanitizer" in proc.stderr, proc.stderr[-2000:]


def test_emulation_catches_missing_syncthreads_race(tsan_driver):
    proc = _selftest(tsan_driver, 4, {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66"})
    assert proc.returncode == 66 and "ThreadSanitizer: data race" in proc.stderr, proc.stderr[-2000:]
