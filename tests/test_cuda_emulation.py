"""The CUDA backend's kernels, executed on the CPU by the SIMT emulation, against the reference.

``csrc/cuda/mira_kernels.cuh`` (the exact source nvcc compiles) is built with g++ against
``tests/cuda_emu/simt_emu.h`` into a standalone driver (AddressSanitizer + UBSan), run once per case
in a subprocess (a second build with ThreadSanitizer checks for races). What the emulation can and cannot
catch is listed in ``tests/cuda_emu/README.md``.
Shapes are small and odd (the emulation runs 256 std::threads per block): T spans partial token
tiles, S*r spans partial register tiles, d_s and N exceed one block's stride.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path

import hypothesis
import pytest
import torch
from hypothesis import given, note, settings

from mira_kernels import reference
from mira_kernels.reference import SEPARATIONS
from tests.cuda_emu import PlanError, build_driver, plan_launches, run_adapter_into_x, run_backward, run_forward
from tests.fuzz import profiles
from tests.fuzz.cases import op_cases
from tests.fuzz.oracle import judge_linear
from tests.mira_inputs import assert_close_to_spec, make_inputs

# B, T (2 token tiles, the last partial), d_in, d_out, N, S (offsets out of order), r, d_s.
SHAPE = dict(B=2, T=11, d_in=13, d_out=24, N=5, S=2, r=3, d_s=7, offsets=[10, 0])
SCALE = 0.7
# Drawn cases per run of the property test below (each is two emulator subprocesses).
EMU_EXAMPLES = int(os.environ.get("MIRA_EMU_EXAMPLES", "16"))


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


def test_norm_at_the_floor_takes_the_unit_vector_branch(driver):
    # ||u|| exactly 1e-12 (the cosine's floor): the tangent projection, as the reference
    # (F.normalize's clamp_min passes the gradient at equality), not g / 1e-12.
    inp = make_inputs(**SHAPE, dtype=torch.float64)
    inp.query[0] = 0.0
    inp.query[0, 0] = 1e-12
    inp.keys[1] = 0.0
    inp.keys[1, 2] = -1e-12
    for separation in ("affine", "softmax"):
        check_backward(driver, inp, separation)


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


@pytest.mark.parametrize("separation", ["affine", "softmax"])
def test_sample_tiles_do_not_change_the_bits(driver, separation):
    # B = 70: the retrieval mixes 8 samples per block (the last tile holds 6); each sample's sums run in
    # the same order as alone, so every sample's output equals, bit for bit, a B = 1 call on it.
    inp = make_inputs(B=70, T=2, d_in=3, d_out=6, N=5, S=2, r=1, d_s=2, dtype=torch.float64)
    run = check_forward(driver, inp, separation)
    assert run.plan[0].kernel == "mira_retrieve_kernel" and run.plan[0].blocks == 9  # ceil(70 / 8) tiles, 1 chunk
    (got,) = run.outputs
    # The alone runs start from rows of the batched base GEMM: the host BLAS gives row 0 of a 140-row GEMM and
    # of a 2-row one different bits on some CPUs (CI's failed here, on an FMA-fused bias add), and that GEMM is
    # ATen's, not the kernels'.
    base = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    for b in (0, 7, 8, 63, 64, 69):
        one = make_inputs(B=70, T=2, d_in=3, d_out=6, N=5, S=2, r=1, d_s=2, dtype=torch.float64)
        for name in ("x", "query"):
            setattr(one, name, getattr(one, name)[b : b + 1].clone())
        (alone,) = run_forward(driver, *one.linear_args(), **_kw(one, separation),
                               base=base[b : b + 1].clone()).outputs
        assert torch.equal(got[b : b + 1], alone), f"sample {b}"
    check_backward(driver, inp, separation)


def test_empty_batch_and_empty_tokens(driver):
    run = check_forward(driver, make_inputs(B=0, T=3, d_in=5, d_out=8, N=2, S=1, r=2, d_s=8), "affine")
    assert run.launches == 0
    run = check_backward(driver, make_inputs(B=0, T=3, d_in=5, d_out=8, N=2, S=1, r=2, d_s=8), "affine")
    assert run.launches == 0
    inp = make_inputs(B=2, T=0, d_in=5, d_out=8, N=3, S=1, r=2, d_s=8)
    assert check_forward(driver, inp, "affine").launches == 1  # the retrieval only
    check_backward(driver, inp, "softmax")  # factor gradients are zero; dq still flows through nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_memory_leaves_inf_in_x_alone(driver, dtype):
    # N = 0 adds exactly zero without reading x (contract section 1): y is the base projection, inf
    # included. The apply kernel used to run with mixed factors of zero, and x A_b^T = inf * 0 = NaN
    # turned the inf row's slice columns NaN (mira_adapter_ wrote NaN into a finite out the same way).
    inp = make_inputs(B=2, T=3, d_in=5, d_out=8, N=0, S=1, r=2, d_s=8, dtype=torch.float64).to(dtype)
    inp.x = inp.x.clone()
    inp.x[0, 1, 2] = float("inf")
    base = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    assert bool(torch.isinf(base[0, 1]).all()) and not bool(torch.isnan(base).any())
    run = run_forward(driver, *inp.linear_args(), **_kw(inp, "affine"))
    assert run.launches == 0 and torch.equal(run.outputs[0], base)
    out = torch.ones(2, 3, 8, dtype=dtype)
    run_forward(driver, *inp.linear_args(), **_kw(inp, "affine"), out=out, base=out.clone())
    assert torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_empty_memory_gives_zero_dquery_for_a_non_finite_query(driver, bad):
    # N = 0 reads neither query nor keys: dquery is exact zeros (the reference), whatever the query holds. The
    # scores kernel used to run the normalisation's backward on a zero gradient, and (u / |u|) . 0 made NaN of
    # the whole row of a query with a NaN or inf. With N = 0 no memory kernel runs; the glue zero-fills dquery.
    inp = make_inputs(B=2, T=3, d_in=5, d_out=8, N=0, S=1, r=2, d_s=8, dtype=torch.float64).to(torch.float32)
    inp.query = inp.query.clone()
    inp.query[1, 2] = bad
    run = check_backward(driver, inp, "affine", mask=(False, True, True, True, True))
    assert torch.equal(run.outputs[1], torch.zeros_like(inp.query))
    assert [launch.kernel for launch in run.plan] == []


@pytest.mark.parametrize("shape", [dict(d_s=0), dict(d_in=0), dict(T=0, N=0), dict(B=0, N=0)])
def test_zero_sized_dims_leave_no_gradient_unwritten(driver, shape):
    # The driver hands the gradients over NaN-filled, as at::empty may (the first GPU run returned its leftovers
    # at B = 0): every element must be written, or zero-filled by the glue where no kernel runs.
    inp = make_inputs(**dict(dict(B=2, T=3, d_in=5, d_out=8, N=2, S=1, r=2, d_s=4), **shape), dtype=torch.float64)
    for separation in ("affine", "softmax"):
        check_forward(driver, inp, separation)
        check_backward(driver, inp, separation)


def test_tile_rows_spilled_to_global_memory(driver):
    # The path taken when S*r is too large for the tile rows' shared memory, forced with a zero budget.
    inp = make_inputs(**SHAPE, dtype=torch.float64)
    assert check_forward(driver, inp, "affine", smem_budget=0).spill
    assert check_backward(driver, inp, "softmax", smem_budget=0).spill
    assert not check_forward(driver, inp, "affine").spill


def test_more_than_sixteen_slices(driver):
    # S = 20 > the 16 offsets that travel in the kernel arguments: they are uploaded to device memory by
    # one extra launch (the backend used to reject S > 16). Out of order, with gaps, r = 1.
    S, d_s = 20, 2
    offsets = [(7 * s % S) * (d_s + 1) for s in range(S)]
    inp = make_inputs(B=2, T=3, d_in=5, d_out=S * (d_s + 1), N=3, S=S, r=1, d_s=d_s, offsets=offsets,
                      dtype=torch.float64)
    run = check_forward(driver, inp, "softmax")
    assert [launch.kernel for launch in run.plan] == ["mira_offsets_kernel", "mira_retrieve_kernel",
                                                       "mira_apply_kernel"]
    run = check_backward(driver, inp, "affine")
    assert run.plan[0].kernel == "mira_offsets_kernel" and run.launches == 6


def test_offsets_upload_in_chunks_of_256():
    # Plan only (no data): 600 slices need three uploads of at most 256 offsets; 16 need none.
    binary = build_driver()
    dims = dict(dtype=torch.float32, B=1, T=4, d_in=8, N=2, d_k=8, r=1, d_s=1)
    plan = plan_launches(binary, backward=False, S=600, **dims).plan
    assert [launch.kernel for launch in plan].count("mira_offsets_kernel") == 3
    plan = plan_launches(binary, backward=False, S=16, **dims).plan
    assert [launch.kernel for launch in plan] == ["mira_retrieve_kernel", "mira_apply_kernel"]


def test_grid_beyond_cuda_limit_is_refused_not_truncated():
    # B * token tiles = 1.2e10 blocks: the launch used to cast the count to 32 bits and run a truncated
    # grid silently; the plan now refuses it (the CUDA glue raises before any work).
    binary = build_driver()
    dims = dict(dtype=torch.bfloat16, T=577, d_in=1024, N=30, d_k=1024, S=2, r=4, d_s=1024,
                slice_offsets=[0, 2048])
    with pytest.raises(PlanError, match="2\\^31 - 1 blocks"):
        plan_launches(binary, backward=False, B=160_000_000, **dims)
    # ViT-L/16@384 at B = 1212 (M * d_out > 2^31 elements): plans with ordinary grids.
    run = plan_launches(binary, backward=True, B=1212, **dims)
    assert max(launch.blocks for launch in run.plan) < 2**31 - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_forward_follows_its_rounding_rule(driver, dtype):
    # Contract, CUDA backend: the base projection comes out of cuBLAS rounded to x's dtype, the adapter
    # term (float32) is added to it and the sum rounded again. Error bound of that rule against the
    # float64 spec: u * |base| + u * |y| (two roundings, u the unit roundoff) plus the float32 work.
    inp = make_inputs(**SHAPE, dtype=torch.float64)
    low = inp.to(dtype, memory_dtype=torch.float32)
    (got,) = run_forward(driver, *low.linear_args(), **_kw(low, "affine")).outputs
    exact = low.to(torch.float64)  # the same rounded inputs, in float64
    base = torch.nn.functional.linear(exact.x, exact.weight, exact.bias)
    y = reference.mira_linear(*exact.linear_args(), **_kw(exact, "affine"))
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    bound = u * base.abs() + u * y.abs() + 1e-5 * (y - base).abs().amax() + 1e-6
    err = (got.double() - y).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"
    # ... and the rule is what runs: rounding the base first then adding the float32 adapter, and rounding
    # once more, reproduces the kernel's result to one unit in the last place.
    rule = (base.to(dtype).double() + (y - base)).to(dtype)
    ulps = ((got.double() - rule.double()).abs() / (u * 2 * rule.double().abs()).clamp_min(1e-30))
    assert ulps.max().item() <= 1.0


def test_strided_out_and_grad(driver):
    inp = make_inputs(**SHAPE, dtype=torch.float32)
    B, T, d_out = SHAPE["B"], SHAPE["T"], SHAPE["d_out"]
    # (T, B, 2 * d_out) storage seen as (B, T, d_out) with every other column: no stride is 1.
    out = torch.zeros(T, B, 2 * d_out).permute(1, 0, 2)[..., ::2]
    assert out.stride() == (2 * d_out, B * 2 * d_out, 2)
    check_forward(driver, inp, "affine", out=out)
    grad = torch.randn(T, B, 2 * d_out).permute(1, 0, 2)[..., ::2]
    check_backward(driver, inp, "softmax", grad_out=grad)
    # With a storage offset (a view that does not start at its storage's first element).
    out = torch.zeros(1 + B * T * d_out)[1:].view(B, T, d_out)
    assert out.storage_offset() == 1
    check_forward(driver, inp, "softmax", out=out)
    grad = torch.randn(3 + B * T * d_out)[3:].view(B, T, d_out)
    check_backward(driver, inp, "affine", grad_out=grad)


# mira_adapter_ into x itself (d_out = d_in): the one overlap the contract allows. 3 token tiles, slices out of
# order covering x's columns, S*r = 6 (a partial register tile).
ALIAS_SHAPE = dict(B=2, T=19, d_in=16, d_out=16, N=3, S=2, r=3, d_s=8, offsets=[8, 0])


def check_adapter_into_x(driver, inp, separation, *, smem_budget=None):
    extra = {} if smem_budget is None else {"smem_budget": smem_budget}
    before = inp.x.clone()
    run = run_adapter_into_x(driver, *inp.adapter_args(), **_kw(inp, separation), **extra)
    (got,) = run.outputs
    assert torch.equal(inp.x, before)  # the harness sent a copy
    # The spec: out = x + adapter(x), the adapter reading x as it was before the call.
    inp64 = inp.to(torch.float64)
    want, same = inp64.x.clone(), inp.x.clone()
    reference.mira_adapter_(want, *inp64.adapter_args(), **_kw(inp, separation))
    reference.mira_adapter_(same, *inp.adapter_args(), **_kw(inp, separation))
    assert got.dtype == inp.x.dtype and got.shape == want.shape
    assert_close_to_spec(got, want, same, factor=2.0, floor=_floor(inp.x.dtype), what=f"out is x ({separation})")
    assert not torch.equal(got, before), "the adapter changed nothing: the test would not see a wrong order"
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_leaves_the_columns_between_slices_bit_for_bit(driver, dtype):
    # Slices with gaps around and between them (columns 0-1, 6-9 and 14-15 belong to no slice): the
    # apply kernel may write only the slices' columns; the others keep x's bits exactly.
    inp = make_inputs(**{**ALIAS_SHAPE, "d_s": 4, "offsets": [10, 2]}, dtype=dtype)
    run = run_adapter_into_x(driver, *inp.adapter_args(), **_kw(inp, "affine"))
    (got,) = run.outputs
    outside = [c for c in range(16) if not (2 <= c < 6 or 10 <= c < 14)]
    assert torch.equal(got[..., outside], inp.x[..., outside])
    assert not torch.equal(got[..., 2:6], inp.x[..., 2:6]) and not torch.equal(got[..., 10:14], inp.x[..., 10:14])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_adapter_into_x_itself(driver, dtype):
    # Each block reads its own token rows of x in full (the shrink, then a barrier) before it writes those rows;
    # no block touches another block's rows. A kernel that wrote a row before every read of it was done would
    # fail here (the expand would read updated x values into h).
    inp = make_inputs(**ALIAS_SHAPE, dtype=dtype)
    assert check_adapter_into_x(driver, inp, "affine").launches == 2
    check_adapter_into_x(driver, inp, "softmax", smem_budget=0)  # tile rows in global memory


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
    # out is x: the reads of x (shrink) and the writes of out are ordered by the block's barriers.
    check_adapter_into_x(tsan_driver, make_inputs(**ALIAS_SHAPE, dtype=dtype), "affine")


def _selftest(driver, mode, env):
    header = [0x4D495241454D55, 0, mode] + [1] * 21 + [0]
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.bin"
        case.write_bytes(struct.pack("<25q", *header) + struct.pack("<q", 0) + struct.pack("<2d", 1.0, 0.01))
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


@pytest.mark.parametrize(("dtype", "memory_dtype", "big"), [
    pytest.param(torch.bfloat16, torch.float32, 2.0**66, id="bf16"),
    pytest.param(torch.float32, torch.float32, 2.0**66, id="fp32"),
    pytest.param(torch.float64, torch.float64, 2.0**520, id="fp64")])
@pytest.mark.parametrize("which", ["query", "keys", "both"])
def test_overflowing_norms_score_as_the_unscaled_rows(driver, dtype, memory_dtype, big, which):
    # A query or key whose |u|^2 overflows the accumulator is rescored scaled by a power of two
    # (overflow_scale); cosines do not change under such a scaling, so the output must be the unscaled
    # call's bit for bit. It scored 0 / inf before (every case failed).
    _check_overflow_is_scale_free(driver, make_inputs(**SHAPE, dtype=torch.float64), dtype, memory_dtype, big,
                                  which, "affine")


@pytest.mark.parametrize("which", ["query", "keys"])
def test_overflowing_norms_with_more_keys_than_one_score_pass(driver, which):
    # N = 300: the keys are scored in two chunks, per sample (softmax's statistics) and per tile (mixing).
    inp = make_inputs(B=2, T=2, d_in=3, d_out=4, N=300, S=1, r=1, d_s=4, dtype=torch.float64)
    _check_overflow_is_scale_free(driver, inp, torch.float32, torch.float32, 2.0**66, which, "softmax")


def _check_overflow_is_scale_free(driver, inp, dtype, memory_dtype, big, which, separation):
    inp = inp.to(dtype, memory_dtype=memory_dtype)
    (plain,) = run_forward(driver, *inp.linear_args(), **_kw(inp, separation)).outputs
    for name in ("query", "keys") if which == "both" else (which,):
        t = getattr(inp, name).clone()
        t[1] *= big
        setattr(inp, name, t)
    (scaled,) = run_forward(driver, *inp.linear_args(), **_kw(inp, separation)).outputs
    assert torch.isfinite(scaled).all()
    assert torch.equal(scaled, plain)


@pytest.mark.parametrize(("dtype", "memory_dtype", "big"), [
    pytest.param(torch.bfloat16, torch.float32, 2.0**66, id="bf16"),
    pytest.param(torch.float32, torch.float32, 2.0**66, id="fp32"),
    pytest.param(torch.float64, torch.float64, 2.0**520, id="fp64"),
    # Finite rows whose norm exceeds the dtype's max: the norm itself is inf there, and the backward, which
    # divided by it, took their unit vectors for 0 (dquery 51% off for such a key, dkeys 6.5e-4 for such a query).
    pytest.param(torch.bfloat16, torch.float32, 2.0**127, id="bf16-norm-above-max"),
    pytest.param(torch.float32, torch.float32, 2.0**127, id="fp32-norm-above-max"),
    pytest.param(torch.float64, torch.float64, 2.0**1023, id="fp64-norm-above-max")])
@pytest.mark.parametrize("which", ["query", "keys"])
def test_overflowing_norms_backward_is_the_unscaled_rows_scaled(driver, dtype, memory_dtype, big, which):
    # The backward reads the retrieval's norms and scores: with a row times 2^66 (2^520), or times 2^127
    # (2^1023) so that its norm exceeds the dtype's max, every gradient is the unscaled call's, bit for bit,
    # except that row's own, which is divided by the same power of two.
    inp = make_inputs(**SHAPE, dtype=torch.float64).to(dtype, memory_dtype=memory_dtype)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inp.x.shape[0], inp.x.shape[1], inp.weight.shape[0], generator=g,
                           dtype=torch.float64).to(dtype)
    row = getattr(inp, which).clone()
    row[1] *= 1.5 / row[1].abs().max()  # entries below 2: finite times 2^127 (2^1023), the norm above 2: beyond
    setattr(inp, which, row)
    limit = torch.finfo(memory_dtype).max  # the norm exceeds it in the cases of big near it, and only there
    assert (big * float(torch.linalg.vector_norm(row[1].double())) > limit) == (big > limit / 4)

    def grads():
        args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b)
        return run_backward(driver, grad_out, *args, **_kw(inp, "affine")).outputs

    plain = grads()
    t = getattr(inp, which).clone()
    t[1] *= big
    assert torch.isfinite(t).all()
    setattr(inp, which, t)
    scaled = grads()
    own = 1 if which == "query" else 2  # (dx, dquery, dkeys, dbank_a, dbank_b)
    # The row's own gradient last: above the max it is tiny (|g| / |u|), the others carry its unit vector.
    for i in sorted(range(5), key=lambda i: i == own):
        want = plain[i].clone()
        if i == own:
            want[1] = plain[i][1] / big
        assert torch.equal(scaled[i], want), ("dx", "dquery", "dkeys", "dbank_a", "dbank_b")[i]


def test_inf_query_entry_gives_nan_cosines_as_the_reference(driver):
    inp = make_inputs(**SHAPE, dtype=torch.float64).to(torch.float32)
    inp.query = inp.query.clone()
    inp.query[0, 2] = float("inf")
    (got,) = run_forward(driver, *inp.linear_args(), **_kw(inp, "affine")).outputs
    want = reference.mira_linear(*inp.linear_args(), **_kw(inp, "affine"))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[0]).any())
    assert torch.isfinite(got[1]).all()


def test_relu_keeps_a_nan_score_nan_forward_and_backward(driver):
    # A NaN query entry makes that sample's scores NaN; relu must keep them NaN (as torch.relu) rather
    # than map them to 0, which would hand the sample a silently finite output.
    inp = make_inputs(**SHAPE, dtype=torch.float64).to(torch.float32)
    inp.query = inp.query.clone()
    inp.query[0, 1] = float("nan")
    kw = _kw(inp, "relu")
    (got,) = run_forward(driver, *inp.linear_args(), **kw).outputs
    want = reference.mira_linear(*inp.linear_args(), **kw)
    assert bool(torch.isnan(want[0]).any()) and torch.equal(torch.isnan(got), torch.isnan(want))
    grad_out = torch.ones_like(want)
    args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b)
    got_g = run_backward(driver, grad_out, *args, **kw).outputs
    want_g = reference.mira_linear_backward(grad_out, *args, **kw)
    for name, g, w in zip(("dx", "dquery", "dkeys", "dbank_a", "dbank_b"), got_g, want_g):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name


# The property suite's drawn cases (tests/fuzz/cases.py: hostile regimes included, huge and non-finite
# values among them), run on the emulated kernels and judged by the same oracle as the other backends.
# Layouts do not matter here (the glue makes every operand contiguous before the kernels); the emulation
# runs each case in a subprocess, so the draw is small and bounded.
@settings(parent=profiles.settings.get_profile("ci"), max_examples=EMU_EXAMPLES)
@given(case=op_cases(max_b=3, max_t=4, max_d=8, max_n=4, max_dk=6, layouts=("contiguous",)))
def test_drawn_cases_match_the_float64_reference(driver, case):
    note(repr(case))
    hypothesis.assume(case.x.shape[0] > 0 and case.x.shape[1] > 0 and case.keys.shape[0] > 0)
    args = (case.x, case.weight, case.bias, case.query, case.keys, case.bank_a, case.bank_b)
    (y,) = run_forward(driver, *args, **case.kwargs()).outputs
    grads = run_backward(driver, case.grad_out, case.x, case.weight, case.query, case.keys, case.bank_a,
                         case.bank_b, **case.kwargs()).outputs
    judge_linear(case, "cuda (emulated)", y, list(grads))


def test_empty_memory_backward_leaves_an_inf_gradient_alone(driver):
    # N = 0 adds exactly zero: dx is grad_out @ weight, an inf of grad_out included (the adapter part's
    # zero factors turned it into NaN in the reference and the CPU kernel; the spec now skips it).
    inp = make_inputs(B=2, T=3, d_in=5, d_out=8, N=0, S=1, r=2, d_s=8, dtype=torch.float64).to(torch.float32)
    grad_out = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    grad_out[1, 0, 3] = float("inf")
    args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b)
    run = run_backward(driver, grad_out, *args, output_mask=(True,) * 5, **_kw(inp, "affine"))
    assert not run.plan and torch.equal(run.outputs[0], grad_out @ inp.weight)
    assert run.outputs[0][1, 0].isinf().all()
