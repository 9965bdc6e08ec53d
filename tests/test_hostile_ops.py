"""The public ops under hostile input: what used to crash, be silently wrong, or be unclear (issue 15).

Every test here failed before its fix. Calls that once corrupted memory run in a child process,
so a regression fails the test instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mira
import mira_kernels as mk
from mira_kernels import _extension
from tests.mira_inputs import make_inputs

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _extension.loaded, reason="the C++ extension did not build")


def run_child(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------------------------
# Crash: a memory tensor whose version counter cannot be read.
# ----------------------------------------------------------------------------------------------

_WITHOUT_VERSION_COUNTER = """
import torch, torch.nn as nn
from mira import AdapterMemory, MemoryConfig, MiraProjection
with torch.inference_mode():
    memory = AdapterMemory(MemoryConfig(d_in=8, d_k=8, num_slices=2, slice_width=8, rank=2, key_norm="unit"))
    layer = MiraProjection(nn.Linear(8, 24), memory, (0, 16), stage="inference")
# Ordinary data in parameters made under inference mode: they say they are ordinary tensors, but have
# no version counter (PyTorch's own view ops refuse them; the cache's key must not read it).
memory.keys.data = torch.randn(3, 8)
memory.bank_a.data, memory.bank_b.data = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 8, 2)
with torch.no_grad():
    first, second = layer(torch.ones(2, 5, 8)), layer(torch.ones(2, 5, 8))
assert torch.equal(first, second) and memory._retrieval_cache is None
print("ok")
"""


@needs_ext
def test_a_parameter_without_a_version_counter_is_never_cached():
    # In a child process: the eval plan's and the retrieval cache's native keys read the missing
    # counter, which threw from a CPython method with nothing to catch it, and the interpreter aborted.
    proc = run_child(_WITHOUT_VERSION_COUNTER, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Crash: slice offsets whose end overflows int64.
# ----------------------------------------------------------------------------------------------

_OVERFLOW_CHILD = """
import json, torch, mira_kernels as mk
torch.manual_seed(0)
x = torch.randn(2, 5, 8); w = torch.randn(24, 8); q = torch.randn(2, 6); k = torch.randn(3, 6)
A2, B2 = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 8, 2)
A1, B1 = A2[:, :1], B2[:, :1]
big = 2**63 - 4
results = {}

def attempt(name, fn):
    try:
        fn()
        results[name] = "returned"
    except (ValueError, TypeError) as e:
        results[name] = type(e).__name__ + ": " + str(e).splitlines()[0]
    except Exception as e:
        results[name] = "other " + type(e).__name__ + ": " + str(e).splitlines()[0]

offsets_cases = {"two": ([0, big], A2, B2), "max": ([2**63 - 1], A1, B1), "min_pair": ([-2**63, 0], A2, B2),
                 "neg_overlap": ([big, -big], A2, B2)}
for tag, (offs, A, B) in offsets_cases.items():
    attempt(f"mira_linear {tag}", lambda: mk.mira_linear(x, w, None, q, k, A, B, slice_offsets=offs))
    attempt(f"adapter {tag}", lambda: mk.mira_adapter_(torch.zeros(2, 5, 24), x, q, k, A, B, slice_offsets=offs))
    attempt(f"_cpu op {tag}", lambda: torch.ops.mira._cpu_mira_linear(x, w, None, q, k, A, B, offs, "affine", 1., .01))
    attempt(f"public op {tag}", lambda: torch.ops.mira.mira_linear(x, w, None, q, k, A, B, offs, "affine", 1., .01,
                                                                    "reference"))
    attempt(f"backward {tag}", lambda: torch.ops.mira._cpu_mira_linear_backward(
        torch.ones(2, 5, 24), x, w, q, k, A, B, offs, "affine", 1., .01, [True] * 5))
    attempt(f"reference {tag}", lambda: mk.reference.mira_linear(x, w, None, q, k, A, B, slice_offsets=offs))
print("RESULTS" + json.dumps(results))
"""


@needs_ext
def test_overflowing_slice_offsets_are_rejected_not_a_crash():
    proc = run_child(_OVERFLOW_CHILD)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-3000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS"):])
    assert len(results) == 24
    for name, outcome in results.items():
        if name.startswith("reference"):
            continue  # the plain reference is not validated; checked through the public API above
        assert outcome.startswith("ValueError") and ("slice" in outcome), f"{name}: {outcome}"


# ----------------------------------------------------------------------------------------------
# Silently wrong: non-finite query / keys must propagate on every backend, for every separation.
# ----------------------------------------------------------------------------------------------

def _inputs(dtype, **kw):
    return make_inputs(B=3, T=4, d_in=8, d_out=24, N=4, S=2, r=2, offsets=[0, 16], **kw).to(
        dtype, memory_dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)


def _poison(inp, where, value):
    if where == "query":
        inp.query[1, 2] = value
    elif where == "key":
        inp.keys[2, 0] = value
    return inp


def _forward_and_grads(inp, backend, separation):
    inp = inp.to(inp.x.dtype, inp.query.dtype).requires_grad_("x", "query", "keys", "bank_a", "bank_b")
    with mk.use_backend(backend):
        y = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, separation=separation)
        grads = torch.autograd.grad(y, [inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b],
                                    torch.ones_like(y))
    return [y.detach(), *grads]


NAMES = ("y", "dx", "dquery", "dkeys", "dbank_a", "dbank_b")


@needs_ext
@pytest.mark.parametrize("separation", mk.SEPARATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("where, value", [("query", float("nan")), ("key", float("nan")), ("query", float("inf")),
                                          ("key", float("-inf"))], ids=["nan-query", "nan-key", "inf-query",
                                                                        "-inf-key"])
def test_non_finite_query_or_key_propagates_like_the_reference(separation, dtype, where, value):
    inp = _poison(_inputs(dtype), where, value)
    want = _forward_and_grads(inp, "reference", separation)
    got = _forward_and_grads(inp, "cpu", separation)
    assert not torch.isfinite(want[0]).all(), "the reference must propagate the non-finite input"
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), f"{name}: non-finite entries differ"


# ----------------------------------------------------------------------------------------------
# Overlapping memory: out vs inputs, and out vs itself (contract section 6).
# ----------------------------------------------------------------------------------------------

def _adapter_inputs():
    return make_inputs(B=1, T=40, d_in=16, d_out=16, N=3, S=1, r=2, d_s=8, offsets=[4], dtype=torch.float32)


def _overlap_cases():
    inp = _adapter_inputs()
    buf = torch.randn(1, 41, 16)
    wide = torch.randn(1, 40, 32)
    yield "out shifted one row over x", buf[:, 1:], buf[:, :40], None
    yield "out shifted one row under x", buf[:, :40], buf[:, 1:], None
    yield "out and x interleaved in one buffer", wide[..., ::2], wide[..., 1::2], None
    flat = torch.randn(600 + 3 * 1 * 2 * 16)
    yield "out overlaps bank_a", flat[:640].view(1, 40, 16), inp.x, flat[600:].view(3, 1, 2, 16)
    yield "out expanded (stride 0)", torch.zeros(1, 1, 16).expand(1, 40, 16), inp.x, None
    yield "out with overlapping rows", torch.zeros(1 * 40 + 15).as_strided((1, 40, 16), (640, 1, 1)), inp.x, None


OVERLAP_CASES = list(_overlap_cases())


def _overlap_case(case):
    """``out`` and the adapter inputs of overlap case ``case`` (its x, and its bank_a if it has one)."""
    _, out, x, bank_a = OVERLAP_CASES[case]
    inp = _adapter_inputs()
    inp.x = x
    if bank_a is not None:
        inp.bank_a = bank_a
    return out, inp


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", range(len(OVERLAP_CASES)), ids=[c[0] for c in OVERLAP_CASES])
def test_adapter_rejects_overlapping_out(case, backend):
    out, inp = _overlap_case(case)
    before = out.clone()
    with mk.use_backend(backend), pytest.raises(ValueError, match="overlap"):
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    assert torch.equal(out, before)


@pytest.mark.parametrize("case", range(len(OVERLAP_CASES)), ids=[c[0] for c in OVERLAP_CASES])
def test_python_checks_alone_reject_overlapping_out(case, without_extension):
    out, inp = _overlap_case(case)
    before = out.clone()
    with pytest.raises(ValueError, match="overlap"):
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    assert torch.equal(out, before)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", range(len(OVERLAP_CASES)), ids=[c[0] for c in OVERLAP_CASES])
def test_op_kernel_rejects_overlapping_out(case, backend):
    out, inp = _overlap_case(case)
    with pytest.raises(ValueError):
        torch.ops.mira.mira_adapter_(out, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, 0.01, backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_adapter_into_x_itself_still_works(backend, dtype):
    inp = _adapter_inputs().to(dtype, torch.float32 if dtype == torch.float16 else dtype)
    want = inp.x.clone()
    mk.reference.mira_adapter_(want, inp.x.clone(), inp.query, inp.keys, inp.bank_a, inp.bank_b,
                               slice_offsets=inp.slice_offsets)
    x = inp.x.clone()
    with mk.use_backend(backend):
        mk.mira_adapter_(x, x, inp.query, inp.keys, inp.bank_a, inp.bank_b, slice_offsets=inp.slice_offsets)
    torch.testing.assert_close(x, want, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-3)


_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_NAN_PAYLOADS = {torch.bfloat16: [-61, 0x7F81], torch.float16: [-509, 0x7C01], torch.float32: [-4194301, 0x7F800001]}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_adapter_leaves_the_columns_between_slices_bit_for_bit(backend, dtype, strided):
    # The CPU kernel used to work on a float32 copy of a 16-bit (or strided) out and copy all of it
    # back: numbers survive that round trip, NaN payloads do not (bfloat16 0xFFC3 came back 0xFFFF).
    inp = _adapter_inputs().to(dtype, torch.float32)
    store = torch.randn(1, 40, 32).to(dtype)
    out = store[..., ::2] if strided else store[..., :16].contiguous()
    bits = out.view(_INT_VIEW[dtype]) if not strided else None
    outside = [c for c in range(16) if not 4 <= c < 12]
    payloads = torch.tensor(_NAN_PAYLOADS[dtype], dtype=_INT_VIEW[dtype])
    for i, c in enumerate(outside):  # NaNs with payloads (signalling and quiet) in every other outside column
        if i % 2 == 0:
            col = payloads[i // 2 % 2].expand(40).clone().view(dtype)
            out[0, :, c] = col
    before = out.clone().view(_INT_VIEW[dtype]) if not strided else out.contiguous().view(_INT_VIEW[dtype])
    with mk.use_backend(backend):
        mk.mira_adapter_(out, inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b, slice_offsets=inp.slice_offsets)
    after = (bits if bits is not None else out.contiguous().view(_INT_VIEW[dtype]))
    assert torch.equal(after[..., outside], before[..., outside])
    assert not torch.equal(after[..., 4:12], before[..., 4:12])  # the slice did get the adapter


def test_adapter_into_disjoint_views_of_one_buffer_works():
    inp = _adapter_inputs()
    buf = torch.randn(1, 80, 16)
    x, out = buf[:, :40], buf[:, 40:]
    x.copy_(inp.x)
    want = out.clone()
    mk.reference.mira_adapter_(want, inp.x, *inp.adapter_args()[1:], slice_offsets=inp.slice_offsets)
    mk.mira_adapter_(out, x, *inp.adapter_args()[1:], slice_offsets=inp.slice_offsets)
    torch.testing.assert_close(out, want)


@needs_ext
@pytest.mark.parametrize("case", range(len(OVERLAP_CASES)), ids=[c[0] for c in OVERLAP_CASES])
def test_native_private_op_rejects_overlapping_out(case):
    # The CPU kernel's own op (what the router calls for backend "cpu") runs the same shared check.
    out, inp = _overlap_case(case)
    before = out.clone()
    with pytest.raises(ValueError, match="overlap"):
        torch.ops.mira._cpu_mira_adapter_(out, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, 0.01)
    assert torch.equal(out, before)


def _aliased_inputs():
    """mira_linear inputs that share memory (only read, so allowed): keys, query = keys[:2], x (one row
    expanded over B and T), weight, bias and the banks are overlapping views of one buffer."""
    buf = torch.randn(260, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    views = dict(x=buf[0:8].view(1, 1, 8).expand(2, 4, 8), weight=buf[8:72].view(8, 8), bias=buf[5:13],
                 query=buf[0:16].view(2, 8), keys=buf[0:24].view(3, 8), bank_a=buf[100:196].view(3, 2, 2, 8),
                 bank_b=buf[150:198].view(3, 2, 4, 2))
    return views, [0, 4]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_linear_with_aliased_and_overlapping_inputs_matches_separate_copies(backend):
    if backend == "cpu" and not _extension.has_kernel("_cpu_mira_linear", "CPU"):
        pytest.skip("the C++ extension did not build")
    views, offsets = _aliased_inputs()
    trained = ("x", "query", "keys", "bank_a", "bank_b")

    def run(tensors):
        leaves = {n: t.detach().requires_grad_(n in trained) for n, t in tensors.items()}
        with mk.use_backend(backend):
            y = mk.mira_linear(*(leaves[n] for n in ("x", "weight", "bias", "query", "keys", "bank_a", "bank_b")),
                               slice_offsets=offsets, separation="softmax")
            grads = torch.autograd.grad(y, [leaves[n] for n in trained], torch.ones_like(y))
        return [y.detach(), *grads]

    got = run(views)  # detach() of a view shares its memory: the leaves still overlap
    assert views["query"].data_ptr() == views["keys"].data_ptr() and views["x"].stride()[:2] == (0, 0)
    want = run({n: t.clone().contiguous() for n, t in views.items()})
    for name, g, w in zip(("y", *trained), got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def test_retrieval_weights_of_a_query_that_is_the_keys():
    keys = torch.randn(4, 8, dtype=torch.float64)
    got = mk.retrieval_weights(keys, keys)
    torch.testing.assert_close(got, mk.retrieval_weights(keys.clone(), keys.clone()), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Silently wrong: a huge query in fp32 / bf16 (its squared norm overflows).
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 3e38], ids=["huge", "tiny", "near-max"])
@pytest.mark.parametrize("separation", ["affine", "softmax"])
def test_retrieval_weights_of_a_huge_or_tiny_query_are_right(dtype, magnitude, separation):
    g = torch.Generator().manual_seed(0)
    q64, k64 = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g,
                                                                                     dtype=torch.float64)
    finfo = torch.finfo(dtype)
    magnitude = min(magnitude, finfo.max / 4)
    if magnitude < finfo.tiny * 1e3:
        magnitude = finfo.tiny * 1e3
    q = (q64 / q64.abs().amax() * magnitude).to(dtype)
    want = mk.reference.retrieval_weights(q.double(), k64.to(dtype).double(), separation=separation)
    got = mk.retrieval_weights(q, k64.to(dtype), separation=separation)
    assert torch.isfinite(got).all()
    # The bound is first-order in the compute dtype's rounding (both sides see the same rounded inputs): a score
    # error of a few eps becomes (ds - w dS) / S in w = s / S, so it grows with sum|w| = sum|s| / |S| (8.3 and
    # ~20 here for the affine rows). A fixed 1e-5 failed by MKL's AVX2 kernels (1.6e-5 near max, 7e-6 at
    # magnitude 1 on AVX-512): the sums' order is the BLAS's, so the bound must hold for any order.
    ct_eps = torch.finfo(mk.reference.compute_dtype(dtype)).eps
    scale = want.abs().amax(-1, keepdim=True) * (1 + want.abs().sum(-1, keepdim=True))
    err = (got.double() - want).abs()
    assert (err <= 8 * ct_eps * scale).all(), err.amax()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_association_matrix_agrees_with_the_op_for_a_huge_query(dtype):
    inp = _inputs(dtype)
    inp.query = inp.query * 1e30 if dtype != torch.float64 else inp.query * 1e200
    weights = mk.retrieval_weights(inp.query, inp.keys)
    # The association matrix against float64 on the same values (16-bit ones widen exactly, and the
    # weights are float32 for them): at the precision of its compute dtype, not a loose bound
    # (1e-2 passed a 0.9% error on every weight; the actual error is 0 in float64, 8e-5 in float32).
    wtol = {torch.bfloat16: 1e-4, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(weights.double(), mk.reference.retrieval_weights(inp.query.double(), inp.keys.double()),
                               rtol=wtol, atol=wtol)
    # And the op uses the same weights: its output agrees with the reference backend's, which computes
    # them with retrieval_weights' own code.
    with mk.use_backend("cpu"):
        y_cpu = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    with mk.use_backend("reference"):
        y_ref = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(y_cpu.double(), y_ref.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Silently wrong: torch.autocast reached retrieval_weights (16-bit cosines) and float64 op inputs.
# ----------------------------------------------------------------------------------------------

def _near_guard_query_and_keys(d=64, n_slots=4):
    # Sample 0's cosines sum to 0.02, near the affine guard, where w = s / sum(s) amplifies every
    # rounding error of the scores: the last key cancels the others' cosines.
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, d, generator=g), torch.randn(n_slots, d, generator=g)
    unit_q = query[0] / query[0].norm()
    others = (torch.nn.functional.normalize(keys[:-1], dim=-1) @ unit_q).sum()
    ortho = torch.randn(d, generator=g)
    ortho = ortho - (ortho @ unit_q) * unit_q
    target = -(others - 0.02)
    keys[-1] = target * unit_q + (1 - target**2).clamp_min(0).sqrt() * ortho / ortho.norm()
    return query, keys


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retrieval_weights_under_autocast_are_the_weights_the_op_uses(dtype, autocast_dtype):
    # The op runs its memory side in float32 with autocast off (contract section 4), and
    # get_association_matrix promises its weights: under autocast they were computed in bfloat16,
    # 0.42 off near the guard (of weights up to 12.8).
    query, keys = _near_guard_query_and_keys()
    query, keys = query.to(dtype), keys.to(dtype)
    want = mk.retrieval_weights(query, keys)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = mk.retrieval_weights(query, keys)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    exact = mk.reference.retrieval_weights(query.double(), keys.double())
    assert (got.double() - exact).abs().max() < 1e-4 * exact.abs().max()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_leaves_float64_calls_alone(backend):
    # As PyTorch's autocast does (F.linear of float64 stays float64): the float64 call was cast down to
    # bfloat16 (x, weight, bias) and float32 (the memory), and returned bfloat16 0.08 off.
    inp = _inputs(torch.float64)
    with mk.use_backend(backend):
        want = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
            weights = mk.retrieval_weights(inp.query, inp.keys)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert weights.dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_casts_the_other_floating_inputs_as_pytorch_does(backend):
    # Every floating dtype but float64 goes to the autocast dtype (ATen: float16 under bfloat16 autocast
    # becomes bfloat16), the memory side to float32; a tensor that is not floating is not cast, so
    # the checks refuse it as they do without autocast.
    inp = _inputs(torch.float16)
    cast = inp.to(torch.bfloat16, torch.float32)
    with mk.use_backend(backend):
        want = mk.mira_linear(*cast.linear_args(), slice_offsets=inp.slice_offsets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want)
            inp.x = inp.x.to(torch.int32)
            with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.int32"):
                mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


def test_meta_tensors_under_autocast_and_the_finiteness_check():
    # Both take the Python path, which asked torch.is_autocast_enabled("meta"): "unknown device type for
    # autocast"; meta tensors have no data to scan for inf / NaN.
    inp = _inputs(torch.float32)
    args = _meta(inp)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), mk.check_finite()):
        with ctx:
            y = mk.mira_linear(*args, slice_offsets=inp.slice_offsets)
            assert y.device.type == "meta" and y.shape == (3, 4, 24) and y.dtype == torch.float32
            out = torch.empty(3, 4, 24, device="meta")
            assert mk.mira_adapter_(out, args[0], *args[3:], slice_offsets=inp.slice_offsets) is out
            assert mk.retrieval_weights(args[3], args[4]).shape == (3, 4)


# ----------------------------------------------------------------------------------------------
# Unclear: a failed call's re-check must not replace the op's own error.
# ----------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_vmap_over_the_adapter_reports_pytorchs_error(backend):
    # The re-check after the op's error read data_ptr() of the BatchedTensor: "Cannot access data
    # pointer of Tensor that doesn't have storage" replaced "Batching rule not implemented".
    inp = _adapter_inputs()
    out = torch.zeros(1, 40, 16)

    def one(o, x, q):
        return mk.mira_adapter_(o[None], x[None], q[None], inp.keys, inp.bank_a, inp.bank_b,
                                slice_offsets=inp.slice_offsets)

    with mk.use_backend(backend), pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.vmap(one)(out, inp.x, inp.query)


@needs_ext
@pytest.mark.parametrize("fn", ["mira_linear", "mira_adapter_"])
def test_a_recheck_that_cannot_run_leaves_the_ops_error(fn, monkeypatch):
    from mira_kernels import _validation, backends

    impl = backends.implementation("reference")

    def kernel_fails(*args):
        raise RuntimeError("the kernel failed")

    def recheck_fails(*args):
        raise RuntimeError("the re-check failed")

    monkeypatch.setattr(impl, fn, kernel_fails)
    monkeypatch.setattr(_validation, "check_mira_linear", recheck_fails)
    monkeypatch.setattr(_validation, "check_mira_adapter", recheck_fails)
    inp = _inputs(torch.float32)
    with mk.use_backend("reference"), pytest.raises(RuntimeError, match="the kernel failed"):
        if fn == "mira_linear":
            mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        else:
            with torch.no_grad():
                mk.mira_adapter_(torch.zeros(3, 4, 24), *inp.adapter_args(), slice_offsets=inp.slice_offsets)


# ----------------------------------------------------------------------------------------------
# Double backward: unsupported, so it raises (it used to return zeros with a warning).
# ----------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_double_backward_raises(backend):
    inp = _inputs(torch.float64).requires_grad_("x", "query", "keys")
    with mk.use_backend(backend):
        y = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        (gq,) = torch.autograd.grad(y.square().sum(), [inp.query], create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(gq.sum(), [inp.keys])
        # create_graph alone is fine when nothing differentiates MIRA's gradients again.
        (gx,) = torch.autograd.grad(y.sum(), [inp.x], create_graph=True)
        assert torch.isfinite(gx).all()


# ----------------------------------------------------------------------------------------------
# torch.func's grad transforms and forward-mode AD: unsupported (contract 5), so they raise, naming the
# op and the way out; never a silently wrong tangent.
# ----------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_grad_transforms_and_forward_ad_raise_naming_the_op_and_the_reference(backend):
    # PyTorch's own messages named neither the op nor the cure (the forward-AD one asked for a PyTorch
    # feature request).
    import torch.autograd.forward_ad as fwAD

    inp = _inputs(torch.float64)
    args = inp.linear_args()

    def f(x):
        return mk.mira_linear(x, *args[1:], slice_offsets=inp.slice_offsets).sum()

    message = r"mira_linear does not support torch\.func's grad.*mira_kernels\.reference"
    with mk.use_backend(backend):
        with pytest.raises(RuntimeError, match=message):
            torch.func.grad(f)(inp.x)
        with fwAD.dual_level(), pytest.raises(RuntimeError, match=message):
            f(fwAD.make_dual(inp.x, torch.ones_like(inp.x)))
        with torch.no_grad(), fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode AD"):
            mk.mira_adapter_(torch.zeros(3, 4, 24, dtype=torch.float64), fwAD.make_dual(inp.x, torch.ones_like(inp.x)),
                             *inp.adapter_args()[1:], slice_offsets=inp.slice_offsets)


@needs_ext
def test_forward_ad_through_an_eval_layer_raises_instead_of_dropping_the_adapters_tangent():
    # The eval fast path judged "no graph needed" by requires_grad alone: a dual input went to the
    # kernel, whose base GEMM (through ATen) carried the tangent W v and whose adapter (raw pointers)
    # none, on the first call and on every plan replay: a tangent 1.36 off, silently.
    import torch.autograd.forward_ad as fwAD

    from tests.tiny_models import filled_vit

    model = filled_vit().double()
    mira.set_stage(model, "inference")
    model.eval()
    proj = mira.projections(model)[0]
    x = torch.randn(2, 17, 192, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the first call makes the eval plan, the second replays it
        with torch.no_grad(), fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
            proj(fwAD.make_dual(x, torch.ones_like(x)))
        with torch.no_grad():
            proj(x)  # an ordinary call between: a plan exists for the replay


# ----------------------------------------------------------------------------------------------
# scale is not clamped: x W^T and the adapter may overflow like any projection (contract 6).
# ----------------------------------------------------------------------------------------------

@needs_ext
def test_huge_scale_is_honoured_not_clamped():
    inp = _inputs(torch.float32)
    with mk.use_backend("reference"):
        want = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, scale=1e300)
    got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, scale=1e300)
    # 1e300 is inf in the float32 compute dtype (scalars keep the tensors' precision): the adapter's
    # slices overflow (inf, or NaN where backends sum infinities of both signs), the rest is x W^T + b.
    assert torch.isinf(want).any() and torch.equal(torch.isfinite(got), torch.isfinite(want))
    inp64 = _inputs(torch.float64)
    with mk.use_backend("reference"):
        want64 = mk.mira_linear(*inp64.linear_args(), slice_offsets=inp64.slice_offsets, scale=1e300)
    got64 = mk.mira_linear(*inp64.linear_args(), slice_offsets=inp64.slice_offsets, scale=1e300)
    assert torch.isfinite(want64).all()  # finite in float64: honoured, not clamped
    torch.testing.assert_close(got64, want64)
    # MIRA's own steps stay finite for finite inputs: the weights are bounded whatever the scale.
    assert torch.isfinite(mk.retrieval_weights(inp.query * 1e30, inp.keys * 1e-30)).all()


@needs_ext
@pytest.mark.parametrize("dtype,scale,x_size", [(torch.float32, 1e30, 1e-25), (torch.float64, 1e300, 1e-20)])
@pytest.mark.parametrize("batch", [1, 3])  # 1: the retrieval runs inside each mixing thread (the small path)
def test_a_scale_that_overflows_folded_into_b_is_applied_to_h_instead(dtype, scale, x_size, batch):
    # The CPU kernel folds scale into the mixed B (one multiply per element, not per token): with
    # |scale| * |B| beyond the dtype's range every adapted output was inf, where the reference, which
    # applies scale last, is finite for small enough x. (The forward now applies |scale| > 1 last,
    # the test below; the backward's dh = G (scale B) still takes it on h where B cannot.)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 2, 4, generator=g, dtype=torch.float64) * x_size).to(dtype).requires_grad_()
    weight = torch.zeros(4, 4, dtype=dtype)
    query, keys = torch.randn(batch, 4, generator=g, dtype=dtype), torch.randn(2, 4, generator=g, dtype=dtype)
    bank_a = torch.randn(2, 1, 1, 4, generator=g, dtype=dtype)
    bank_b = (torch.randn(2, 1, 4, 1, generator=g, dtype=dtype) * 1e10).requires_grad_()
    kw = dict(slice_offsets=[0], separation="softmax", scale=scale)
    args = (x, weight, None, query, keys, bank_a, bank_b)
    want = mk.reference.mira_linear(*(a.detach().double() if a is not None else None for a in args), **kw)
    assert torch.isfinite(want).all()
    with mk.use_backend("cpu"):
        got = mk.mira_linear(*args, **kw)
        out = torch.zeros_like(want, dtype=dtype)
        mk.mira_adapter_(out, x.detach(), query, keys, bank_a, bank_b.detach(), **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    # The backward's dh = G (scale B) takes the same place for scale: dx as the reference's.
    grad = torch.ones_like(got) * x_size
    (dx,) = torch.autograd.grad(got, x, grad)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(mk.reference.mira_linear(x64, *(a.detach().double() if a is not None else None
                                                              for a in args[1:]), **kw), x64, grad.double())
    assert torch.isfinite(dx64).all()
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["cancellation", "near_max"])
def test_a_large_scale_multiplies_the_finished_sum_as_the_reference_does(dtype, case):
    # Folded into B_b (or h), |scale| > 1 made each product h_j (scale B_j) overflow where the
    # reference's scale * sum_j h_j B_j is finite: terms that cancel over r, or a result near the
    # dtype's largest value. The cpu kernel gave +-inf there, some with the wrong sign (-inf for
    # +2.9e38); the forward now multiplies the finished sum, in the reference's order.
    big = torch.finfo(dtype).max
    inp = make_inputs(B=2, T=3, d_in=8, d_out=24, N=3, S=2, r=2, d_s=8, offsets=[16, 0], seed=2).to(dtype)
    if case == "cancellation":
        inp.bank_a.mul_(big ** 0.26), inp.bank_b.mul_(big ** 0.26)  # 1e10 and 1e20 in float32
        scale = big ** 0.52
    else:
        scale = big * 0.9
    kw = dict(slice_offsets=inp.slice_offsets, scale=scale)
    want = mk.reference.mira_linear(*inp.to(torch.float64).linear_args(), **kw)
    finite = want.to(dtype).isfinite()
    assert finite.sum() > want.numel() // 4
    got = mk.mira_linear(*inp.linear_args(), **kw)
    out = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    mk.mira_adapter_(out, inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b, **kw)
    with mk.use_backend("reference"):
        same_dtype = mk.mira_linear(*inp.linear_args(), **kw)
    for y in (got, out):
        assert y[finite].isfinite().all(), "inf or NaN where the float64 result fits the dtype"
        torch.testing.assert_close(y[finite].double(), want[finite].to(dtype).double(), rtol=1e-4, atol=0)
    assert torch.equal(got.isfinite(), same_dtype.isfinite())


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_large_scale_multiplies_the_finished_backward_sum_as_the_reference_does(backend):
    # The backward's twin of the test above: with scale folded into the mixed B, dh = sum_e G_e (scale B_e)
    # overflowed term by term where the reference's scale * sum_e G_e B_e is exactly 0 (a slice gradient
    # orthogonal to B_b). The cpu kernel gave dx = inf and dquery / dkeys = NaN (found by probing,
    # 2026-12-08). The values are chosen so that every product is exact in float32 (the one stored slot's
    # weight is its cosine, 1; 10 * 1e8 = 1e9): dx, dquery, dkeys and dbank_a are exactly 0 in any order
    # of summation, so the test can ask for 0, not for 0 within a rounding allowance.
    dtype = torch.float32
    x = torch.full((1, 1, 1), 1e-30, dtype=dtype)
    weight = torch.zeros(2, 1, dtype=dtype)
    query, keys = torch.tensor([[1.0, 0.0]], dtype=dtype), torch.tensor([[2.0, 0.0]], dtype=dtype)
    bank_a = torch.ones(1, 1, 1, 1, dtype=dtype)
    bank_b = torch.tensor([1e8, -1e8], dtype=dtype).view(1, 1, 2, 1)  # scale * B = 1e38 finite, G . B = 0
    grad = torch.full((1, 1, 2), 10.0, dtype=dtype)
    kw = dict(slice_offsets=[0], separation="affine", scale=1e30)

    def grads(leaves, fn):
        leaves = [t.clone().requires_grad_() for t in leaves]
        y = fn(leaves[0], weight.to(leaves[0].dtype), None, *leaves[1:], **kw)
        return torch.autograd.grad(y, leaves, grad.to(y.dtype))

    leaves = (x, query, keys, bank_a, bank_b)
    want = grads([t.double() for t in leaves], mk.reference.mira_linear)
    with mk.use_backend(backend):
        got = grads(leaves, mk.mira_linear)
    for name, g, w in zip(("dx", "dquery", "dkeys", "dbank_a", "dbank_b"), got, want):
        assert g.isfinite().all(), f"{name}: {g.flatten().tolist()}, the float64 gradient {w.flatten().tolist()}"
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=0, msg=name)
    assert not any(w.any() for w in want[:4]) and want[4].abs().min() > 1  # the case is what it claims


# ----------------------------------------------------------------------------------------------
# torch.compile with dynamic shapes and symbolic floats.
# ----------------------------------------------------------------------------------------------

@needs_ext
def test_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    inp = _inputs(torch.float32)

    def f(x, q, k, scale, eps):
        return mk.mira_linear(x, inp.weight, inp.bias, q, k, inp.bank_a, inp.bank_b, slice_offsets=inp.slice_offsets,
                              scale=scale, eps=eps)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for B, scale, eps in ((3, 0.5, 1e-2), (5, 2.0, 0.25)):
        x, q = torch.randn(B, 4, 8), torch.randn(B, 8)
        want = f(x, q, inp.keys, scale, eps)
        torch.testing.assert_close(compiled(x, q, inp.keys, scale, eps), want)
    torch._dynamo.reset()


def _permuted(t):
    """t with the same values in a dense but non-contiguous layout (its dimensions stored in reverse)."""
    dims = list(range(t.dim()))[::-1]
    return t.permute(*dims).contiguous().permute(*dims)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("n_slots", [4, 0])
def test_backward_fake_kernel_has_the_gradients_strides(backend, n_slots):
    # The gradients are returned contiguous whatever the inputs' layout; the fake kernel said they
    # had the inputs' strides, so torch.compile's stride check failed for a permuted x or keys.
    inp = make_inputs(B=2, T=3, d_in=6, d_out=12, N=n_slots, S=2, r=2, d_s=4, offsets=[0, 8], dtype=torch.float32)
    x, query, keys, bank_a, bank_b = (_permuted(t) for t in inp.adapter_args())
    grad_out = _permuted(torch.randn(2, 3, 12))
    args = (grad_out, x, inp.weight, query, keys, bank_a, bank_b, inp.slice_offsets, "affine", 1.0, 0.01,
            [True] * 5, backend)
    torch.library.opcheck(torch.ops.mira.mira_linear_backward.default, args, test_utils=("test_faketensor",))


@needs_ext
def test_compiled_training_step_with_permuted_inputs():
    torch._dynamo.reset()
    inp = make_inputs(B=2, T=3, d_in=6, d_out=12, N=4, S=2, r=2, d_s=4, offsets=[0, 8], dtype=torch.float32)

    def loss(x, query, keys, bank_a, bank_b):
        y = mk.mira_linear(x, inp.weight, inp.bias, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets)
        return (y * y).sum()

    def grads(fn):
        leaves = [_permuted(t).requires_grad_() for t in inp.adapter_args()]
        return torch.autograd.grad(fn(*leaves), leaves)

    for got, want in zip(grads(torch.compile(loss, fullgraph=True)), grads(loss)):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Meta tensors and FakeTensor: shape inference through the ops and the public functions.
# ----------------------------------------------------------------------------------------------

def _meta(inp):
    return [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inp.linear_args()]


@needs_ext
def test_meta_tensors_through_the_op_and_the_public_function():
    inp = _inputs(torch.float32)
    x, weight, bias, query, keys, bank_a, bank_b = _meta(inp)
    y = torch.ops.mira.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, inp.slice_offsets, "affine", 1.0,
                                   0.01)
    assert y.device.type == "meta" and y.shape == (3, 4, 24)
    y = mk.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets)
    assert y.device.type == "meta" and y.shape == (3, 4, 24) and y.dtype == torch.float32
    grads = torch.ops.mira.mira_linear_backward(torch.empty(3, 4, 24, device="meta"), x, weight, query, keys,
                                                bank_a, bank_b, inp.slice_offsets, "affine", 1.0, 0.01, [True] * 5)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (x, query, keys, bank_a, bank_b)]
    out = torch.empty(3, 4, 24, device="meta")
    assert mk.mira_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets) is out
    assert mk.retrieval_weights(query, keys).shape == (3, 4)
    with pytest.raises(ValueError, match="bank_a must have shape"):
        mk.mira_linear(x, weight, bias, query, keys, bank_a[:1], bank_b, slice_offsets=inp.slice_offsets)


@needs_ext
def test_fake_tensors_through_the_public_functions():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inp = _inputs(torch.float32)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inp.linear_args()]
        fake[0].requires_grad_(True)
        y = mk.mira_linear(*fake, slice_offsets=inp.slice_offsets)
        assert y.shape == (3, 4, 24)
        (gx,) = torch.autograd.grad(y.sum(), [fake[0]])
        assert gx.shape == fake[0].shape
        out = mode.from_tensor(torch.zeros(3, 4, 24))
        mk.mira_adapter_(out, fake[0].detach(), *fake[3:], slice_offsets=inp.slice_offsets)


# ----------------------------------------------------------------------------------------------
# Scalars and argument types: one rule on every path.
# ----------------------------------------------------------------------------------------------

BAD_SCALARS = [
    (dict(scale="2"), TypeError, "scale must be a real number"),
    (dict(eps="0.5"), TypeError, "eps must be a real number"),
    (dict(scale=torch.tensor(2.0)), TypeError, "scale must be a real number"),
    (dict(eps=None), TypeError, "eps must be a real number"),
    (dict(scale=True), TypeError, "scale must be a real number"),
    (dict(scale=1 + 2j), TypeError, "scale must be a real number"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite number > 0"),
]


@pytest.mark.parametrize("path", ["eager", "check_finite", "reference", "autocast"])
@pytest.mark.parametrize("kw, exc, msg", BAD_SCALARS)
def test_scalar_arguments_are_judged_alike_on_every_path(kw, exc, msg, path):
    inp = _inputs(torch.float32)
    import contextlib

    ctx = {"eager": contextlib.nullcontext(), "check_finite": mk.check_finite(),
           "reference": mk.use_backend("reference"), "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[path]
    with ctx:
        with pytest.raises(exc, match=msg):
            mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, **kw)
        with pytest.raises(exc, match=msg):
            out = torch.zeros(3, 4, 24)
            mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets, **kw)


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1.0, "0.5", None])
def test_retrieval_weights_judges_eps_like_the_ops(eps):
    q, k = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises((ValueError, TypeError), match="eps must be"):
        mk.retrieval_weights(q, k, eps=eps)


def test_numeric_scalars_of_other_types_are_accepted():
    np = pytest.importorskip("numpy")
    inp = _inputs(torch.float64)
    want = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, scale=2.0, eps=0.25)
    for scale, eps in ((2, 0.25), (np.float32(2.0), np.float64(0.25)), (np.int64(2), 0.25)):
        got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, scale=scale, eps=eps)
        torch.testing.assert_close(got, want)


# bias and the memory tensors: found by `make fuzz` (a list bias reached `.dtype` before the type check).
@pytest.mark.parametrize("which", ["x", "weight", "bias", "query", "keys", "bank_a", "bank_b", "out"])
def test_python_lists_give_a_clear_type_error(which):
    inp = _inputs(torch.float32)
    if which == "out":
        with pytest.raises(TypeError, match="out must be a Tensor"):
            mk.mira_adapter_(torch.zeros(3, 4, 24).tolist(), *inp.adapter_args(), slice_offsets=inp.slice_offsets)
        return
    setattr(inp, which, getattr(inp, which).tolist())
    with pytest.raises(TypeError, match=f"{which} must be a Tensor"):
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=f"{which} must be a Tensor"):
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


@pytest.mark.parametrize("name, exc, msg", [(3, TypeError, "backend name"), (b"cpu", TypeError, "backend name"),
                                            ("cuda9", ValueError, "unknown MIRA backend 'cuda9'")])
def test_use_backend_rejects_bad_names_at_once(name, exc, msg):
    with pytest.raises(exc, match=msg):
        with mk.use_backend(name):
            pass


def test_use_backend_accepts_names_in_any_case_and_spacing():
    inp = _inputs(torch.float64)
    with mk.use_backend("  Reference "):
        assert mk.resolve_backend("cpu") == "reference"
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


# ----------------------------------------------------------------------------------------------
# Found by the property suite: without a bias the autograd node read the wrong arguments'
# requires_grad (it counted the missing bias), refusing valid calls or failing "Index out of range".
# ----------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("wanted", [("x", "query", "keys", "bank_a", "bank_b"), ("x", "keys"), ("query",),
                                    ("bank_b",)])
def test_gradients_of_a_projection_without_bias(backend, wanted):
    inp = make_inputs(bias=False, dtype=torch.float64).requires_grad_(*wanted)
    leaves = [getattr(inp, n) for n in wanted]
    want = torch.autograd.grad(mk.reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets).sum(),
                               leaves)
    with mk.use_backend(backend):
        y = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        got = torch.autograd.grad(y.sum(), leaves)
    for name, g, w in zip(wanted, got, want):
        torch.testing.assert_close(g, w, msg=name)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_memory_backward_leaves_an_inf_gradient_alone(backend, dtype):
    # N = 0 adds exactly zero (the forward reads no x for it): the backward's adapter part of dx, a
    # product with zero factors, turned an inf of grad_out into NaN; autograd of the forward gives
    # grad_out @ weight, inf included.
    inp = make_inputs(B=2, T=3, d_in=4, d_out=12, N=0, S=2, r=2, d_s=4, offsets=[8, 0]).to(
        dtype, torch.float32 if dtype == torch.bfloat16 else dtype)
    grad_out = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(4)).to(dtype)
    grad_out[1, 0, 3] = float("inf")
    grad_out[0, 2, 9] = float("-inf")  # inside a slice: the column the adapter part covers
    x = inp.x.clone().requires_grad_()
    with mk.use_backend(backend):
        y = mk.mira_linear(x, inp.weight, inp.bias, inp.query, inp.keys, inp.bank_a, inp.bank_b,
                           slice_offsets=inp.slice_offsets)
        (dx,) = torch.autograd.grad(y, [x], grad_out)
    want = grad_out @ inp.weight
    assert torch.equal(dx.isnan(), want.isnan()) and not dx.isnan().any()
    assert torch.equal(dx.isinf(), want.isinf()) and dx.isinf().any()
    finite = want.isfinite()
    torch.testing.assert_close(dx[finite], want[finite])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_adapter_into_an_inference_tensor_outside_inference_mode_changes_nothing(backend):
    # ATen raised this too, but only after the kernel had written the slices (as for add_).
    inp = _adapter_inputs()
    with torch.inference_mode():
        out = torch.zeros(1, 40, 16)
    with mk.use_backend(backend), pytest.raises(RuntimeError, match="inference tensor"):
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    assert torch.equal(out, torch.zeros(1, 40, 16))
    with torch.inference_mode(), mk.use_backend(backend):  # inside inference mode it is allowed
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    assert not torch.equal(out, torch.zeros(1, 40, 16))


@needs_ext
@pytest.mark.parametrize("caller", ["torch.ops", "compile"])
def test_adapter_into_an_inference_tensor_is_refused_before_writing_by_every_caller(caller):
    # The Python wrapper's eager check is skipped while tracing and by direct op calls: there the
    # kernel wrote the slices and only then did ATen's version bump raise. (Not the aot_eager
    # backend: its graph writes out back with ATen's copy_, which writes before it refuses.)
    inp = _adapter_inputs()
    args = inp.adapter_args()
    if caller == "torch.ops":
        def call(out):
            torch.ops.mira.mira_adapter_(out, *args, inp.slice_offsets, "affine", 1.0, mk.reference.DEFAULT_EPS, "cpu")
    else:
        torch._dynamo.reset()
        call = torch.compile(lambda out: mk.mira_adapter_(out, *args, slice_offsets=inp.slice_offsets), fullgraph=True)
    with torch.inference_mode():
        out = torch.zeros(1, 40, 16)
    with pytest.raises(RuntimeError, match="mira_adapter_: out is an inference tensor"), torch.no_grad():
        call(out)
    assert torch.equal(out, torch.zeros(1, 40, 16))
