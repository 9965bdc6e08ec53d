"""The C++ CPU kernel (csrc/cpu/): forward, every gradient, mira_adapter_, each instruction-set variant.

Criterion (docs/kernels.md section 5): against the float64 reference, the kernel's max-abs error is
no worse than 2x (forward) / 3x (gradients) plain PyTorch's own error at the same dtype, plus a
small absolute floor; at float64 it matches to ~1e-10 relative.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mira_kernels as mk
from mira_kernels import reference
from mira_kernels.reference import SEPARATIONS
from tests.mira_inputs import assert_close_to_spec, make_inputs, max_err

pytestmark = pytest.mark.skipif(
    "cpu" not in mk.available_backends("cpu"), reason="mira_kernels._C was built without the CPU kernel"
)

GRAD_NAMES = ("x", "query", "keys", "bank_a", "bank_b")
ISAS = list(torch.ops.mira._cpu_isa_info())[1:] if "cpu" in mk.available_backends("cpu") else []
EPS = reference.DEFAULT_EPS


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs the test once per instruction-set variant this CPU supports (MIRA_CPU_ISA)."""
    monkeypatch.setenv("MIRA_CPU_ISA", request.param)
    assert torch.ops.mira._cpu_isa_info()[0] == request.param
    return request.param


def cpu_forward(inp, separation="affine", scale=1.0):
    return torch.ops.mira._cpu_mira_linear(
        *inp.linear_args(), inp.slice_offsets, separation, scale, EPS
    )


def cpu_backward(inp, grad_out, separation="affine", scale=1.0, mask=(True,) * 5):
    return torch.ops.mira._cpu_mira_linear_backward(
        grad_out, inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets, separation,
        scale, EPS, list(mask),
    )


def ref_forward(inp, separation="affine", scale=1.0):
    return reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, separation=separation,
                                 scale=scale, eps=EPS)


def ref_backward(inp, grad_out, separation="affine", scale=1.0):
    return reference.mira_linear_backward(
        grad_out, inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b, slice_offsets=inp.slice_offsets,
        separation=separation, scale=scale, eps=EPS,
    )


def check_against_spec(inp64, low, separation="affine", scale=1.0, seed=1):
    """Forward and all five gradients of the kernel at `low`'s dtypes vs float64, house criterion."""
    g = torch.Generator().manual_seed(seed)
    grad64 = torch.randn(*inp64.x.shape[:2], inp64.weight.shape[0], generator=g, dtype=torch.float64)
    grad_low = grad64.to(low.x.dtype)
    assert_close_to_spec(cpu_forward(low, separation, scale), ref_forward(inp64, separation, scale),
                         ref_forward(low, separation, scale), factor=2.0, what="forward")
    got = cpu_backward(low, grad_low, separation, scale)
    want = ref_backward(inp64, grad64, separation, scale)
    own = ref_backward(low, grad_low, separation, scale)
    for name, a, w, o, src in zip(GRAD_NAMES, got, want, own, (low.x, low.query, low.keys, low.bank_a, low.bank_b)):
        assert a.shape == src.shape and a.dtype == src.dtype, name
        assert_close_to_spec(a, w, o, factor=3.0, floor=1e-5, what=f"d{name}")


def test_registered_and_default_for_cpu(monkeypatch):
    monkeypatch.delenv("MIRA_BACKEND", raising=False)
    assert mk.available_backends("cpu") == ["reference", "cpu"]
    assert mk.backends.resolve_backend("cpu") == "cpu"
    assert "baseline" in ISAS  # every x86-64 CPU runs the baseline variant


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("regime", ["random", "one_slot", "negative", "near_zero"])
def test_float64_forward_and_gradients_match_spec(isa, separation, regime):
    inp = make_inputs(B=3, T=9, d_in=19, d_out=45, N=5, S=2, r=3, d_s=13, offsets=[30, 2], regime=regime)
    scale = -0.7  # a negative scale exercises signs through every term
    y, want = cpu_forward(inp, separation, scale), ref_forward(inp, separation, scale)
    assert max_err(y, want) <= 1e-11 * max(1.0, want.abs().max().item())
    grad_out = torch.randn_like(y)
    for name, a, w in zip(GRAD_NAMES, cpu_backward(inp, grad_out, separation, scale),
                          ref_backward(inp, grad_out, separation, scale)):
        assert max_err(a, w) <= 1e-10 * max(1.0, w.abs().max().item()), name


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_float32_within_pytorch_error(isa, separation):
    inp = make_inputs(B=3, T=37, d_in=40, d_out=96, N=6, S=2, r=4, d_s=32, offsets=[0, 64])
    check_against_spec(inp, inp.to(torch.float32), separation, scale=0.8)


@pytest.mark.parametrize("regime", ["negative", "near_zero"])
def test_float32_stress_weights(regime):
    inp = make_inputs(B=2, T=11, d_in=24, d_out=48, N=5, S=2, r=2, d_s=16, offsets=[0, 32], regime=regime)
    if regime == "near_zero":  # the affine sum sits inside the guard: weights bounded, gradient finite
        assert reference.cosine_scores(inp.query, inp.keys).sum(-1).abs().max() < EPS
    else:
        assert (mk.retrieval_weights(inp.query, inp.keys) < 0).any()
    check_against_spec(inp, inp.to(torch.float32))


def test_odd_vit_like_shapes():
    inp = make_inputs(B=2, T=197, d_in=123, d_out=369, N=3, S=2, r=4, d_s=123, offsets=[0, 246])
    check_against_spec(inp, inp.to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_fp32", [True, False])
def test_half_precision_x(dtype, memory_fp32):
    inp = make_inputs(B=2, T=10, d_in=24, d_out=48, N=4, S=2, r=4, d_s=16, offsets=[0, 32])
    low = inp.to(dtype, torch.float32 if memory_fp32 else dtype)
    check_against_spec(inp, low)


@pytest.mark.parametrize(
    "shape",
    [
        dict(B=0, T=4, d_in=8, d_out=24, N=3),
        dict(B=2, T=0, d_in=8, d_out=24, N=3),
        dict(B=2, T=4, d_in=8, d_out=24, N=0),
        dict(B=2, T=4, d_in=8, d_out=24, N=1),
        dict(B=1, T=3, d_in=8, d_out=8, N=2, S=1, r=1, d_s=8, offsets=[0]),
        dict(B=2, T=5, d_in=8, d_out=24, N=3, bias=False),
    ],
)
def test_degenerate_shapes(shape):
    inp = make_inputs(**shape)
    y = cpu_forward(inp)
    assert y.shape == (inp.x.shape[0], inp.x.shape[1], inp.weight.shape[0])
    assert max_err(y, ref_forward(inp)) <= 1e-12 * max(1.0, y.abs().max().item() if y.numel() else 1.0)
    if shape["N"] == 0:  # empty memory: the op is the stock Linear, bit for bit
        assert torch.equal(y, torch.nn.functional.linear(inp.x, inp.weight, inp.bias))
    grad_out = torch.randn_like(y)
    for name, a, w, src in zip(GRAD_NAMES, cpu_backward(inp, grad_out), ref_backward(inp, grad_out),
                               (inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b)):
        assert a.shape == src.shape, name
        assert max_err(a, w) <= 1e-11 * max(1.0, w.abs().max().item() if w.numel() else 1.0), name


@pytest.mark.parametrize("separation", ["affine", "softmax", "tanh"])
def test_gradcheck_through_public_op(separation):
    regime = "near_zero" if separation == "affine" else "random"
    inp = make_inputs(B=2, T=3, d_in=5, d_out=12, N=3, S=2, r=2, d_s=4, offsets=[8, 0], regime=regime)
    inp.requires_grad_(*GRAD_NAMES)

    def f(x, query, keys, bank_a, bank_b):
        return mk.mira_linear(x, inp.weight, inp.bias, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets,
                              separation=separation, scale=0.9)

    with mk.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, [getattr(inp, n) for n in GRAD_NAMES], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("separation", ["softmax", "affine"])
def test_norm_at_the_floor_takes_the_unit_vector_branch(separation):
    # ||u|| exactly 1e-12 (the cosine's floor): the reference's gradient is the tangent projection
    # (normalize(u) = u / ||u|| there, as F.normalize's clamp_min passes it), not g / 1e-12.
    inp = make_inputs(B=2, T=3, d_in=4, d_out=12, N=3, S=2, r=2, d_s=4, offsets=[8, 0])
    inp.query[0] = torch.tensor([1e-12, 0.0, 0.0, 0.0], dtype=torch.float64)
    inp.keys[1] = torch.tensor([0.0, -1e-12, 0.0, 0.0], dtype=torch.float64)
    grad_out = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = cpu_backward(inp, grad_out, separation)
    want = ref_backward(inp, grad_out, separation)
    for name, a, w in zip(GRAD_NAMES, got, want):
        assert max_err(a, w) <= 1e-10 * max(1.0, w.abs().max().item()), name


def test_opcheck():
    inp = make_inputs(B=2, T=3, d_in=6, d_out=12, N=3, S=2, r=2, d_s=4, offsets=[0, 8], dtype=torch.float32)
    inp.requires_grad_(*GRAD_NAMES)
    args = (*inp.linear_args(), inp.slice_offsets, "affine", 1.0, EPS)
    torch.library.opcheck(torch.ops.mira.mira_linear.default, (*args, "cpu"))
    # The private ops have no fake kernels (the public ops carry them); check their schemas
    # (incl. that _cpu_mira_adapter_ mutates exactly `out`) and autograd registration.
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.mira._cpu_mira_linear.default, plain, test_utils=utils)
    out = torch.randn(2, 3, 12)
    torch.library.opcheck(torch.ops.mira._cpu_mira_adapter_.default, (out, plain[0], *plain[3:7], *plain[7:]),
                          test_utils=utils)
    grad_out = torch.randn(2, 3, 12)
    bwd = (grad_out, plain[0], plain[1], *plain[3:7], *plain[7:], [True, False, True, True, False])
    torch.library.opcheck(torch.ops.mira._cpu_mira_linear_backward.default, bwd, test_utils=utils)


def test_output_mask_computes_only_what_is_asked():
    inp = make_inputs(B=2, T=5, d_in=8, d_out=24, N=3, dtype=torch.float32)
    grad_out = torch.randn(2, 5, 24)
    full = cpu_backward(inp, grad_out)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = cpu_backward(inp, grad_out, mask=mask)
        for j, (p, f) in enumerate(zip(part, full)):
            if j == i:
                assert torch.equal(p, f), GRAD_NAMES[j]
            else:
                assert p.numel() == 0, GRAD_NAMES[j]


def test_bitwise_deterministic_across_runs():
    inp = make_inputs(B=4, T=45, d_in=40, d_out=96, N=7, S=2, r=4, d_s=32, offsets=[64, 0], dtype=torch.float32)
    grad_out = torch.randn(4, 45, 96)
    first = (cpu_forward(inp), *cpu_backward(inp, grad_out))
    second = (cpu_forward(inp), *cpu_backward(inp, grad_out))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_adapter_bitwise_equal_at_any_thread_count():
    # The kernel's own reductions have a fixed order independent of how work is split; the
    # adapter op runs no GEMM, so its result must not depend on the thread count at all.
    inp = make_inputs(B=3, T=50, d_in=40, d_out=96, N=5, S=2, r=4, d_s=32, offsets=[0, 64], dtype=torch.float32)
    base = torch.randn(3, 50, 96)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = base.clone()
            torch.ops.mira._cpu_mira_adapter_(out, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, EPS)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("dtype", "bank_dtype"), [(torch.float32, None), (torch.float64, None),
                                                   (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_each_sample_of_a_batch_is_its_batch_of_one_bit_for_bit(isa, dtype, bank_dtype):
    # From two samples on, the mixing keeps every slot's term in registers for several samples at
    # once (mix_block); one sample takes axpy_block's tiles. Both are the same FMA chain per element,
    # so a sample's adapter must not depend on the batch it came in: B covers the row blocks of both
    # register widths (2 AJ, AJ, a pair, a single row), and F = S r (d_in + d_s) = 402 a scalar tail.
    for B in (2, 3, 9, 11):
        inp = make_inputs(B=B, T=3, d_in=37, d_out=70, N=7, S=2, r=3, d_s=30, offsets=[40, 0], dtype=dtype, seed=B)
        if bank_dtype is not None:
            inp.bank_a, inp.bank_b = inp.bank_a.to(bank_dtype), inp.bank_b.to(bank_dtype)
        batch = torch.zeros(B, 3, 70, dtype=dtype)
        torch.ops.mira._cpu_mira_adapter_(batch, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, EPS)
        assert batch.abs().sum() > 0
        for b in range(B):
            one = dataclasses.replace(inp, x=inp.x[b : b + 1].clone(), query=inp.query[b : b + 1].clone())
            alone = torch.zeros(1, 3, 70, dtype=dtype)
            torch.ops.mira._cpu_mira_adapter_(alone, *one.adapter_args(), one.slice_offsets, "affine", 1.0, EPS)
            assert torch.equal(batch[b : b + 1], alone), (B, b)


def test_seeding_pass_is_bias_plus_adapter_at_any_thread_count():
    # The forward's seeding pass writes bias + adapter into every row (slices in any order, bias in
    # the columns between them), the threads splitting the rows evenly, so a split can fall inside
    # a sample (T = 45 at 1, 2, 3 threads). With a zero weight the GEMM adds exact zeros, so the
    # output is that pass's, bit for bit: the adapter op's chain over a bias-filled output.
    inp = make_inputs(B=3, T=45, d_in=40, d_out=120, N=5, S=2, r=4, d_s=32, offsets=[64, 0], dtype=torch.float32)
    inp.weight = torch.zeros_like(inp.weight)
    want = inp.bias.expand(3, 45, 120).clone()
    torch.ops.mira._cpu_mira_adapter_(want, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, EPS)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(cpu_forward(inp), want), n
    finally:
        torch.set_num_threads(threads)


def test_phase_clock_charges_the_bias_copy_to_seeding():
    # benchmarks/budget.py reads shrink/expand as the seeding phase over the empty-memory op's:
    # that op's bias copy must be in its seeding phase, not in its GEMM (where it hid ~150 us).
    inp = make_inputs(B=2, T=9, d_in=16, d_out=48, N=3, dtype=torch.float32)
    empty = make_inputs(B=2, T=9, d_in=16, d_out=48, N=0, dtype=torch.float32)
    torch.ops.mira._cpu_phase_clock(True)
    try:
        cpu_forward(empty)
        entry, retrieval, mixing, seeding, gemm = torch.ops.mira._cpu_last_phases()
        assert retrieval == 0 and mixing == 0 and seeding > 0 and gemm > 0
        cpu_forward(inp)
        assert all(p > 0 for p in torch.ops.mira._cpu_last_phases())
    finally:
        torch.ops.mira._cpu_phase_clock(False)
    assert torch.equal(cpu_forward(empty), torch.nn.functional.linear(empty.x, empty.weight, empty.bias))


def test_scratch_reuse_across_shapes_and_threads():
    # The mixed factors live in a per-thread scratch buffer reused across calls: calls of growing
    # and shrinking sizes, and calls from several threads at once, must each get their own answer.
    import concurrent.futures

    cases = [make_inputs(B=b, T=7, d_in=d, d_out=3 * d, N=n, dtype=torch.float32, seed=b + n)
             for b, d, n in ((1, 8, 2), (6, 40, 9), (2, 16, 3), (5, 64, 30), (1, 8, 1))]
    grads = [torch.randn(c.x.shape[0], 7, c.weight.shape[0]) for c in cases]
    want = [(cpu_forward(c), *cpu_backward(c, g)) for c, g in zip(cases, grads)]
    for c, g, w in zip(cases, grads, want):  # same order again: a grown buffer reused for small calls
        for a, b in zip((cpu_forward(c), *cpu_backward(c, g)), w):
            assert torch.equal(a, b)

    def run(i):
        c, g = cases[i % len(cases)], grads[i % len(cases)]
        return i % len(cases), (cpu_forward(c), *cpu_backward(c, g))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for i, got in pool.map(run, range(24)):
            for a, b in zip(got, want[i]):
                assert torch.equal(a, b)


def test_isa_variants_agree():
    inp = make_inputs(B=2, T=21, d_in=37, d_out=90, N=5, S=2, r=4, d_s=30, offsets=[0, 60], dtype=torch.float32)
    grad_out = torch.randn(2, 21, 90)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ISAS:
            mp.setenv("MIRA_CPU_ISA", name)
            results[name] = (cpu_forward(inp), *cpu_backward(inp, grad_out))
    first = results[ISAS[0]]
    for name, res in results.items():  # different FMA use and lane counts: close, not bitwise
        for a, b in zip(res, first):
            assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_isa_override_rejects_unknown_and_unsupported(monkeypatch):
    monkeypatch.setenv("MIRA_CPU_ISA", "sse9")
    inp = make_inputs(B=1, T=2, d_in=4, d_out=12, N=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="MIRA_CPU_ISA"):  # a bad value (the rule of mira_kernels/_config.py)
        cpu_forward(inp)
    monkeypatch.setenv("MIRA_CPU_ISA", "AUTO")
    assert torch.ops.mira._cpu_isa_info()[0] == ISAS[-1]


def test_non_contiguous_inputs_give_identical_results():
    inp = make_inputs(B=3, T=6, d_in=10, d_out=30, N=4, dtype=torch.float32)
    grad_out = torch.randn(3, 6, 30)
    want = (cpu_forward(inp), *cpu_backward(inp, grad_out))
    nc = make_inputs(B=3, T=6, d_in=10, d_out=30, N=4, dtype=torch.float32)
    nc.x = inp.x.transpose(0, 1).contiguous().transpose(0, 1)
    nc.weight = inp.weight.T.contiguous().T
    nc.query = inp.query.T.contiguous().T
    nc.keys = inp.keys.T.contiguous().T
    nc.bank_a = inp.bank_a.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    nc.bank_b = inp.bank_b.transpose(2, 3).contiguous().transpose(2, 3)
    nc.bias = torch.stack([inp.bias, inp.bias], 1)[:, 0]
    assert not (nc.x.is_contiguous() or nc.bank_b.is_contiguous() or nc.bias.is_contiguous())
    got = (cpu_forward(nc), *cpu_backward(nc, grad_out.transpose(0, 1).contiguous().transpose(0, 1)))
    for a, b in zip(got, want):
        assert max_err(a, b) <= 1e-6 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_adapter_inplace_matches_reference(dtype):
    inp = make_inputs(B=2, T=9, d_in=16, d_out=48, N=4, S=2, r=4, d_s=16, offsets=[32, 0])
    low = inp.to(dtype, torch.float32 if dtype == torch.bfloat16 else dtype)
    out = torch.randn(2, 48, 9, dtype=torch.float64).transpose(1, 2)  # non-contiguous, written in place
    out_low = out.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    assert not out_low.is_contiguous()
    want64, own = out.clone(), out_low.clone()
    reference.mira_adapter_(want64, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    reference.mira_adapter_(own, *low.adapter_args(), slice_offsets=inp.slice_offsets)
    ptr = out_low.data_ptr()
    torch.ops.mira._cpu_mira_adapter_(out_low, *low.adapter_args(), inp.slice_offsets, "affine", 1.0, EPS)
    assert out_low.data_ptr() == ptr
    assert_close_to_spec(out_low, want64, own, factor=2.0, floor=1e-12 if dtype == torch.float64 else 1e-6)


# ---- streaming (non-temporal) stores in the seeding passes -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape",
    [
        dict(B=3, T=21, d_in=40, d_out=96, N=5, S=2, r=4, d_s=32, offsets=[64, 0]),  # rows and slices aligned
        dict(B=2, T=9, d_in=37, d_out=91, N=3, S=2, r=3, d_s=29, offsets=[5, 50]),  # nothing aligned, tails
        dict(B=2, T=9, d_in=24, d_out=72, N=3, S=1, r=9, d_s=48, offsets=[16]),  # rank over one register block
        dict(B=2, T=9, d_in=24, d_out=72, N=3, S=2, r=1, d_s=24, offsets=[0, 48]),  # rank 1: S*r in one block
        dict(B=2, T=7, d_in=16, d_out=48, N=0),  # empty memory: the bias seeding of the Linear alone
        dict(B=2, T=7, d_in=16, d_out=48, N=4, bias=False),  # zeros outside the slices
    ],
)
def test_streaming_stores_give_the_same_bits(isa, monkeypatch, dtype, shape):
    inp = make_inputs(**shape, dtype=dtype)
    grad_out = torch.randn(*inp.x.shape[:2], inp.weight.shape[0], dtype=dtype)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MIRA_CPU_STREAM", mode)
        assert torch.ops.mira._cpu_streams_into(grad_out) == (mode == "1")
        results[mode] = (cpu_forward(inp), *cpu_backward(inp, grad_out))
    for name, a, b in zip(("y",) + GRAD_NAMES, results["0"], results["1"]):
        assert torch.equal(a, b), name
    if shape["N"] == 0:
        assert torch.equal(results["1"][0], torch.nn.functional.linear(inp.x, inp.weight, inp.bias))


def test_streaming_choice_follows_size_and_residency(monkeypatch):
    monkeypatch.delenv("MIRA_CPU_STREAM", raising=False)
    streams = torch.ops.mira._cpu_streams_into
    assert not streams(torch.zeros(1024))  # fits in cache: ordinary stores
    # The threshold: the threads' L2 caches, 2 MiB, and a quarter of the last-level cache.
    from benchmarks.budget import last_level_cache_bytes

    threshold = torch.ops.mira._cpu_stream_threshold_bytes()
    assert threshold >= max(2 << 20, last_level_cache_bytes() // 4)
    # Over 32 MiB: glibc maps a block this size afresh, so its pages have not been touched yet
    # (streaming into pages the kernel has just zeroed through the cache loses, see the kernel).
    fresh = torch.empty(max(threshold, 32 << 20) // 4 + 1024)
    assert not streams(fresh)
    fresh.fill_(1.0)  # now resident, and larger than the threshold
    assert streams(fresh)
    at_threshold = torch.ones(threshold // 4)  # resident, but small enough to stay in cache
    assert not streams(at_threshold)
    monkeypatch.setenv("MIRA_CPU_STREAM", "0")
    assert not streams(fresh)
    monkeypatch.setenv("MIRA_CPU_STREAM", "1")
    assert streams(torch.zeros(4))
    monkeypatch.setenv("MIRA_CPU_STREAM", "sometimes")
    with pytest.raises(ValueError, match="MIRA_CPU_STREAM"):  # a bad value (the rule of mira_kernels/_config.py)
        streams(fresh)
