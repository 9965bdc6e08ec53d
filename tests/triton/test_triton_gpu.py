"""The Triton backend on a GPU: ViT-B sizes against the spec, determinism, CUDA graphs, torch.compile.

Skipped without a CUDA device; written to run unchanged on one (``pytest -m gpu tests/triton``).
All calls go through the public ops with ``use_backend("triton")``, so routing, autograd and
the fake kernels are exercised as a user would.
"""

from __future__ import annotations

import pytest
import torch

import mira_kernels as mk
from mira_kernels import reference
from mira_kernels.reference import SEPARATIONS
from tests.mira_inputs import assert_close_to_spec, check_cls_query_against_spec, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and "triton" not in mk.available_backends("cuda"),
        reason="the triton backend cannot run here",
    ),
]

# ViT-B/16 qkv projection with adapters on Q and V: d = 768, d_out = 2304, slices at 0 and 1536.
VIT_B = dict(B=2, T=197, d_in=768, d_out=2304, N=30, S=2, r=4, d_s=768, offsets=[0, 1536])
GRAD_NAMES = ("x", "query", "keys", "bank_a", "bank_b")
HALF = (torch.float16, torch.bfloat16)


def _cuda(inp, dtype, memory_dtype=None):
    # The memory (query, keys, banks) in x's dtype by default, as mira.attach makes it for a model of
    # that dtype (bank_dtype defaults to the model's): the path 16-bit models run. Until 2026-12-08
    # these tests built float32 memories under 16-bit x, a configuration attach never makes, so the
    # bf16 memory's kernels were checked on a GPU only through the layer-level tests; the float32
    # memory under 16-bit x keeps its own cases (test_vit_b_matches_reference).
    out = inp.to(dtype, memory_dtype=memory_dtype or dtype)
    for name in ("x", "weight", "bias", "query", "keys", "bank_a", "bank_b"):
        t = getattr(out, name)
        if t is not None:
            setattr(out, name, t.cuda())
    return out


def _kw(inp, separation="affine", scale=1.0):
    return dict(slice_offsets=inp.slice_offsets, separation=separation, scale=scale)


def _forward_backward(inp, separation, grad_out, backend="triton"):
    leaves = [getattr(inp, n).detach().clone().requires_grad_(True) for n in GRAD_NAMES]
    x, q, k, a, b = leaves
    with mk.use_backend(backend):
        y = mk.mira_linear(x, inp.weight, inp.bias, q, k, a, b, **_kw(inp, separation))
        y.backward(grad_out)
    return y.detach(), [t.grad for t in leaves]


def _check_against_spec(inp, separation, grad_out, what, forward=True):
    y, grads = _forward_backward(inp, separation, grad_out)
    exact = _cuda(inp, torch.float64)  # the same (rounded) values, in float64
    if forward:
        want = reference.mira_linear(*exact.linear_args(), **_kw(exact, separation))
        same = reference.mira_linear(*inp.linear_args(), **_kw(inp, separation))
        assert_close_to_spec(y, want, same, factor=2.0, what=f"forward {what}")
    args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b)
    args64 = (exact.x, exact.weight, exact.query, exact.keys, exact.bank_a, exact.bank_b)
    want_g = reference.mira_linear_backward(grad_out.double(), *args64, **_kw(inp, separation))
    same_g = reference.mira_linear_backward(grad_out, *args, **_kw(inp, separation))
    for name, got, w, s in zip(GRAD_NAMES, grads, want_g, same_g):
        assert got.dtype == getattr(inp, name).dtype
        assert_close_to_spec(got, w, s, factor=3.0, what=f"d{name} {what}")


def test_backend_is_available():
    import mira_kernels.triton as tri

    assert tri.unavailable_reason() is None
    assert "triton" in mk.available_backends("cuda")


# The memory in x's dtype (as attach makes it), and a float32 memory under 16-bit x (bank_dtype=float32).
_MEMORY_CASES = [(d, s, None) for d in (torch.float32, torch.float16, torch.bfloat16)
                 for s in ("affine", "softmax", "tanh")]
_MEMORY_CASES += [(d, "affine", torch.float32) for d in HALF]


@pytest.mark.parametrize("dtype, separation, memory_dtype", _MEMORY_CASES)
def test_vit_b_matches_reference(dtype, separation, memory_dtype):
    # fp32 with TF32 off (PyTorch's default): the kernels use IEEE fp32 dots, like cuBLAS here.
    assert not torch.backends.cuda.matmul.allow_tf32
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), dtype, memory_dtype)
    grad_out = torch.randn(VIT_B["B"], VIT_B["T"], VIT_B["d_out"], device="cuda", dtype=dtype)
    _check_against_spec(inp, separation, grad_out, f"{dtype} {separation}")


@pytest.mark.parametrize("batch", [1, 64])
def test_vit_b_batch_sizes_fp16(batch):
    inp = _cuda(make_inputs(**{**VIT_B, "B": batch}, regime="negative", dtype=torch.float64), torch.float16)
    grad_out = torch.randn(batch, VIT_B["T"], VIT_B["d_out"], device="cuda", dtype=torch.float16)
    _check_against_spec(inp, "affine", grad_out, f"fp16 B={batch}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vit_b_batch_64_negative_other_dtypes(dtype):
    # The fp16 B = 64 failure (dquery 5.5x PyTorch's error: tensor-core cosines near the affine guard,
    # contract section 11) was shared by every fp32 compute dtype's backward; the fix (fp64 cosines,
    # dw on FMA units) covers them all. The CPU model: tests/triton/test_grad_precision.py.
    # bf16's forward was left out until its rule kept h and B_b in fp32 (TF32 expand): with them in bf16
    # it emulated at 2.9x PyTorch's error on these inputs (weights up to 9 near the guard); now 1.4x.
    inp = _cuda(make_inputs(**{**VIT_B, "B": 64}, regime="negative", dtype=torch.float64), dtype)
    grad_out = torch.randn(64, VIT_B["T"], VIT_B["d_out"], device="cuda", dtype=dtype)
    _check_against_spec(inp, "affine", grad_out, f"{dtype} B=64 negative")


def test_fp32_with_tf32_enabled():
    # TF32-aware bound: operands rounded to 10 mantissa bits, K = 768 products per output.
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), torch.float32)
    exact = _cuda(inp, torch.float64)
    want = reference.mira_linear(*exact.linear_args(), **_kw(exact))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad(), mk.use_backend("triton"):
            y = mk.mira_linear(*inp.linear_args(), **_kw(inp))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    rel = (y.double() - want).abs().max().item() / want.abs().max().item()
    assert rel < 5e-3, f"TF32 relative error {rel:.2e}"


@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize(
    "shape",
    [
        dict(B=3, T=17, d_in=123, d_out=300, N=7, S=3, r=5, d_s=100, offsets=[200, 0, 100]),
        dict(B=2, T=5, d_in=12, d_out=36, N=0, S=2, r=3),
        dict(B=2, T=5, d_in=12, d_out=36, N=1, S=2, r=3),
        dict(B=4, T=70, d_in=64, d_out=192, N=256, S=2, r=64, d_s=64, offsets=[0, 128]),
    ],
)
def test_odd_shapes_float64(shape, separation):
    inp = _cuda(make_inputs(**shape, dtype=torch.float64), torch.float64)
    grad_out = torch.randn(inp.x.shape[0], inp.x.shape[1], inp.weight.shape[0], device="cuda", dtype=torch.float64)
    y, grads = _forward_backward(inp, separation, grad_out)
    want = reference.mira_linear(*inp.linear_args(), **_kw(inp, separation))
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    want_g = reference.mira_linear_backward(
        grad_out, inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b, **_kw(inp, separation)
    )
    for name, got, w in zip(GRAD_NAMES, grads, want_g):
        torch.testing.assert_close(got, w, rtol=1e-8, atol=1e-8, msg=f"d{name}")


def test_near_zero_affine_sum():
    inp = _cuda(make_inputs(**VIT_B, regime="near_zero", dtype=torch.float64), torch.float32)
    grad_out = torch.randn(VIT_B["B"], VIT_B["T"], VIT_B["d_out"], device="cuda")
    _check_against_spec(inp, "affine", grad_out, "near-zero affine sum")


def test_empty_batch():
    inp = _cuda(make_inputs(B=0, T=4, d_in=12, d_out=36, N=3, S=2, r=3, dtype=torch.float32), torch.float32)
    y, grads = _forward_backward(inp, "affine", torch.randn(0, 4, 36, device="cuda"))
    assert y.shape == (0, 4, 36)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads[1:])


def test_adapter_in_place_on_strided_out():
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), torch.float16)
    base = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    storage = torch.zeros(VIT_B["T"], VIT_B["B"], 2 * VIT_B["d_out"], device="cuda", dtype=torch.float16)
    out = storage.permute(1, 0, 2)[..., ::2]
    out.copy_(base)
    with torch.no_grad(), mk.use_backend("triton"):
        mk.mira_adapter_(out, *inp.adapter_args(), **_kw(inp))
    exact = _cuda(inp, torch.float64)
    want = reference.mira_linear(*exact.linear_args(), **_kw(exact))
    same = reference.mira_linear(*inp.linear_args(), **_kw(inp))
    # The base was rounded to fp16 before the add: allow that rounding on top of the house bound.
    assert_close_to_spec(out, want, same, factor=3.0, floor=1e-3, what="adapter_")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_runs_bitwise_equal(dtype):
    inp = _cuda(make_inputs(**{**VIT_B, "B": 8}, dtype=torch.float64), dtype)
    grad_out = torch.randn(8, VIT_B["T"], VIT_B["d_out"], device="cuda", dtype=dtype)
    y1, g1 = _forward_backward(inp, "softmax", grad_out)
    y2, g2 = _forward_backward(inp, "softmax", grad_out)
    assert torch.equal(y1, y2)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), f"d{name} differs between runs (no atomics anywhere: it must not)"


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="TMA descriptors need sm_90")
@pytest.mark.parametrize("overrides", [dict(tma=True), dict(tma=True, persistent=True)], ids=["tma", "tma-persistent"])
@pytest.mark.parametrize("batch", [64, 256])  # the one-item 128 x 256 tile, and many items per program
def test_tma_main_loop_gives_the_pointer_loop_bits_and_replays_in_a_graph(batch, overrides):
    # configs.overriding(tma=True) (what make gpu-check times as mira[triton+tma]): the same tiles,
    # zero-filled at the edges by the copy engine, the same dots in the same order; persistent: the
    # same work items, fewer programs. The persistent launch takes the narrow tile (configs.
    # one_tile_fits), so it is compared with the one-item launch forced onto that tile.
    from mira_kernels.triton import configs

    inp = _cuda(make_inputs(**{**VIT_B, "B": batch}, dtype=torch.float64), torch.bfloat16)
    kw = _kw(inp, "affine")
    block_m, block_n, block_k, num_warps, num_stages = configs.NARROW_TILE
    tile = dict(gemm=dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)) \
        if overrides.get("persistent") else {}
    with torch.no_grad(), mk.use_backend("triton"):
        with configs.overriding(**tile):
            want = mk.mira_linear(*inp.linear_args(), **kw)
        with configs.overriding(**tile, **overrides):
            got = mk.mira_linear(*inp.linear_args(), **kw)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = mk.mira_linear(*inp.linear_args(), **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(replayed, want)


def test_programs_without_an_adapted_first_tile_first_give_row_block_order_bits():
    # bf16 ViT-B/16 at B = 64: one 128 x 256 tile per program, the K slice's programs launched first
    # (LEAD_GROUPS, with PDL on Hopper). Each (row block, tile) is still one program's whole work: the
    # bits must be those of row-block order (the interpreter checks the mapping; this, the compiled
    # kernel and the wait placement).
    from mira_kernels.triton import launchers

    inp = _cuda(make_inputs(**{**VIT_B, "B": 64}, dtype=torch.float64), torch.bfloat16)
    outputs = []
    for lead in (None, 0):
        y, plan = launchers.plan_linear(*inp.linear_args(), inp.slice_offsets, "affine", 1.0, 1e-2)
        if lead is None:
            assert plan[-1].constexprs["LEAD_GROUPS"] > 0
        else:
            plan[-1].constexprs["LEAD_GROUPS"] = lead
        y.fill_(float("nan"))
        launchers.run_all(plan, y.device)
        torch.cuda.synchronize()
        outputs.append(y)
    assert torch.isfinite(outputs[0]).all() and torch.equal(outputs[0], outputs[1])


def test_cuda_graph_capture_and_replay():
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), torch.bfloat16)
    static = [t.clone() for t in inp.linear_args()]
    kw = _kw(inp, "affine")

    def step():
        with torch.no_grad(), mk.use_backend("triton"):
            return mk.mira_linear(*static, **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the capture (Triton compile, allocator)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()

    fresh = _cuda(make_inputs(**VIT_B, dtype=torch.float64, seed=7), torch.bfloat16)
    for dst, src in zip(static, fresh.linear_args()):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad(), mk.use_backend("triton"):
        eager = mk.mira_linear(*fresh.linear_args(), **kw)
    assert torch.equal(y_static, eager)


class _MiraProjection(torch.nn.Module):
    """A frozen qkv projection with a MIRA memory, calling the op directly (no mira/ layers)."""

    def __init__(self, inp):
        super().__init__()
        self.register_buffer("weight", inp.weight)
        self.register_buffer("bias", inp.bias)
        self.keys = torch.nn.Parameter(inp.keys.clone())
        self.bank_a = torch.nn.Parameter(inp.bank_a.clone(), requires_grad=False)
        self.bank_b = torch.nn.Parameter(inp.bank_b.clone(), requires_grad=False)
        self.offsets = list(inp.slice_offsets)

    def forward(self, x):
        query = x[:, 0, :]  # the CLS token's view as the query, as the layers pass it (identity query module)
        return mk.mira_linear(x, self.weight, self.bias, query, self.keys, self.bank_a, self.bank_b,
                              slice_offsets=self.offsets, separation="affine")


def test_torch_compile_reduce_overhead():
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), torch.float16)
    module = _MiraProjection(inp)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    with mk.use_backend("triton"):
        for seed in range(4):  # the first calls record, later ones replay the CUDA graph
            x = _cuda(make_inputs(**VIT_B, dtype=torch.float64, seed=seed), torch.float16).x
            with torch.no_grad():
                got = compiled(x).clone()
                want = module(x)
            assert torch.equal(got, want), f"compiled output differs at call {seed}"
        x = inp.x.clone().requires_grad_(True)
        y = compiled(x)
        y.float().square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and module.keys.grad is not None


def test_opcheck_public_ops_with_triton():
    inp = _cuda(make_inputs(B=2, T=5, d_in=12, d_out=36, N=4, S=2, r=3, dtype=torch.float64), torch.float32)
    args = (*inp.linear_args(), inp.slice_offsets, "softmax", 0.5, 1e-2, "triton")
    torch.library.opcheck(torch.ops.mira.mira_linear.default, args)
    out = torch.randn(2, 5, 36, device="cuda")
    adapter = (out, *inp.adapter_args(), inp.slice_offsets, "softmax", 0.5, 1e-2, "triton")
    torch.library.opcheck(torch.ops.mira.mira_adapter_.default, adapter)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 64])
def test_cls_view_query_as_the_layers_pass_it(dtype, batch):
    # A 16-bit x over a float32 memory: the layers pass the CLS view x[:, 0] itself as the query. The
    # third H200 run's bf16 Triton backward aborted in compilation on exactly that (fp64 cosines fed by
    # a 16-bit load), which the other tests' float32 queries never reach.
    # The fourth H200 run measured the bf16 forward here (B = 1) at 2.07x PyTorch's error under the old
    # bf16 rule (h and B_b in bf16), a strict xfail until the rule kept them in fp32 for a TF32 expand
    # (contract section 11; its emulation: 1.04x at these inputs).
    inp = _cuda(make_inputs(**{**VIT_B, "B": batch}, dtype=torch.float64), dtype)
    grad_out = torch.randn(batch, VIT_B["T"], VIT_B["d_out"], device="cuda", dtype=torch.float64)
    check_cls_query_against_spec(inp, _cuda(inp, torch.float64), grad_out, "triton", f"{dtype} B={batch}")


@pytest.mark.parametrize("dtype", [*HALF, torch.float64])
@pytest.mark.parametrize("which", ["query", "keys", "both"])
def test_overflowing_norms_score_as_the_unscaled_rows(dtype, which):
    # A row times a power of two whose square overflows the forward's compute type (2^66 in fp32, 2^520 in
    # fp64) has the same cosines: the output must be the unscaled call's bit for bit (the interpreter
    # test at ViT-B/16 shapes, compiled; bf16 included, which the interpreter cannot judge).
    big = 2.0**520 if dtype == torch.float64 else 2.0**66
    inp = _cuda(make_inputs(**VIT_B, dtype=torch.float64), dtype)
    with mk.use_backend("triton"):
        plain = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        for name in ("query", "keys") if which == "both" else (which,):
            t = getattr(inp, name).clone()
            t[1] *= big
            setattr(inp, name, t)
        scaled = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert torch.isfinite(scaled).all()
    assert torch.equal(scaled, plain)


def test_layers_normalize_keys_in_one_launch_under_a_cuda_graph():
    # mira.memory._per_feature_unit on a GPU: normalize_columns, in a captured graph too (derived keys
    # are recomputed at every replay), equal to F.normalize within its own error.
    import mira.memory as mm
    from mira_kernels import triton as mt

    keys = torch.randn(30, 768, device="cuda")
    assert mm._fused_key_norm_applies(keys)
    want = torch.nn.functional.normalize(keys.double(), dim=0, eps=reference.NORM_EPS)
    own = (torch.nn.functional.normalize(keys, dim=0, eps=reference.NORM_EPS).double() - want).abs().max().item()
    got = mm._per_feature_unit(keys)  # also the eager warm-up a capture needs (a first launch compiles)
    assert (got.double() - want).abs().max().item() <= max(2 * own, torch.finfo(torch.float32).eps)
    out = torch.empty_like(keys)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(mm._per_feature_unit(keys))
    keys.mul_(3.0)  # an in-place update between replays is seen (nothing cached in the graph)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mt.normalize_columns(keys, reference.NORM_EPS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_keys_are_normalized_in_one_launch_within_one_rounding(dtype):
    # The compiled kernel stores 16-bit keys' result itself (under the interpreter, bfloat16 goes through
    # a float32 store and a cast): within one unit in the last place of the fp64 result, and one launch.
    from mira_kernels import triton as mt
    from mira_kernels.triton import launchers

    keys = torch.randn(30, 768, device="cuda").to(dtype)
    out, launch = launchers.plan_normalize_columns(keys, reference.NORM_EPS)
    assert out.dtype == dtype
    got = mt.normalize_columns(keys, reference.NORM_EPS)
    exact = torch.nn.functional.normalize(keys.double(), dim=0, eps=reference.NORM_EPS)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert got.dtype == dtype and ((got.double() - exact).abs() <= ulp).all()
