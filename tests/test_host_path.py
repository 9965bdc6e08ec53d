"""The forward's plan cache (mira_kernels/triton/plan_cache.py) and the host-path harness
(benchmarks/host_path.py), on CPU: replayed plans must launch exactly what the planner launches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mira_kernels.triton import configs, launchers, plan_cache  # noqa: E402

from .triton import _subprocess  # noqa: E402


@pytest.fixture
def cache_on_cpu(monkeypatch):
    monkeypatch.setattr(plan_cache, "DEVICE_TYPES", {"cpu"})
    plan_cache.clear()
    yield
    plan_cache.clear()


def _inputs(B=2, T=5, d=32, d_out=96, r=4, N=3, dtype=torch.bfloat16, bias=True, offsets=(0, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def t(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    S = len(offsets)
    return [t(B, T, d), t(d_out, d), t(d_out) if bias else None, t(B, d, dt=mem), t(N, d, dt=mem),
            t(N, S, r, d, dt=mem), t(N, S, d, r, dt=mem)], list(offsets)


def _same_launches(replayed, y_new, planned, y_ref, inputs):
    """Replayed launches equal the planner's: kernels, grids, every non-tensor keyword; tensor
    arguments the same inputs (pointer) or fresh memory of the same dtype and at least the size."""
    live = [la for la in planned if all(g > 0 for g in la.grid)]
    assert len(replayed) == len(live)
    assert y_new.shape == y_ref.shape and y_new.dtype == y_ref.dtype
    in_ptrs = {t.data_ptr() for t in inputs if t is not None and t.numel()}
    for rep, la in zip(replayed, live):
        assert rep.kernel is la.kernel
        assert tuple(rep.grid) == tuple(la.grid)
        want = _keywords(la)
        got = _keywords(rep) if isinstance(rep, launchers.Launch) else rep.kwargs
        assert set(got) == set(want), la.name
        for name, w in want.items():
            g = got[name]
            if isinstance(w, torch.Tensor):
                assert isinstance(g, torch.Tensor) and g.dtype == w.dtype, (la.name, name)
                if w.data_ptr() in in_ptrs:
                    assert g.data_ptr() == w.data_ptr(), (la.name, name)
                else:
                    assert g.data_ptr() not in in_ptrs, (la.name, name)
                    assert g.untyped_storage().nbytes() >= w.untyped_storage().nbytes(), (la.name, name)
            else:
                assert g == w and type(g) is type(w), (la.name, name)


def _keywords(la: launchers.Launch) -> dict:
    """What Launch.run passes to kernel[grid](...)."""
    kw = dict(la.args, **la.constexprs, num_warps=la.num_warps, num_stages=la.num_stages)
    if la.pdl:
        kw["launch_pdl"] = True
    if la.maxnreg is not None:
        kw["maxnreg"] = la.maxnreg
    return kw


CASES = {
    "bf16": dict(),
    "fp16": dict(dtype=torch.float16),
    "fp32": dict(dtype=torch.float32),
    "fp64": dict(dtype=torch.float64),
    "no_bias": dict(bias=False),
    "no_slots": dict(N=0),
    "no_tokens": dict(B=0),
    "one_slice": dict(offsets=(32,)),
    "wide_rank": dict(r=48),  # the separate shrink launch
}


@pytest.mark.parametrize("name", list(CASES))
def test_replay_launches_what_the_planner_launches(cache_on_cpu, name):
    inputs, offsets = _inputs(**CASES[name])
    args = (*inputs, offsets, "affine", 0.5, 1e-2)
    y_ref, planned = launchers.plan_linear(*args)
    y1, first = plan_cache.plan_linear(*args)  # the miss: planned on probes, then replayed
    y2, second = plan_cache.plan_linear(*args)  # the hit
    for y, launches in ((y1, first), (y2, second)):
        _same_launches(launches, y, planned, y_ref, inputs)
    assert y1.numel() == 0 or y1.data_ptr() != y2.data_ptr()  # every call allocates its own output and workspaces
    # Zero-size inputs have no memory to tell the probes apart: planned on every call.
    assert len(plan_cache._CACHE) == (0 if name in ("no_slots", "no_tokens") else 1)


MASKS = {"all": [True] * 5, "x_query_keys": [True, True, True, False, False],
         "x_only": [True, False, False, False, False], "banks_only": [False, False, False, True, True]}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", ["bf16", "fp32", "fp16", "wide_rank", "one_slice"])
def test_backward_replay_launches_what_the_planner_launches(cache_on_cpu, name, mask):
    inputs, offsets = _inputs(**CASES[name])
    x, weight, _, query, keys, bank_a, bank_b = inputs
    grad_out = torch.randn(x.shape[0], x.shape[1], weight.shape[0]).to(x.dtype)
    tensors = (grad_out, x, weight, query, keys, bank_a, bank_b)
    args = (*tensors, offsets, "affine", 0.5, 1e-2, MASKS[mask])
    grads_ref, planned = launchers.plan_linear_backward(*args)
    for _ in range(2):  # the miss, then the hit
        grads, launches = plan_cache.plan_linear_backward(*args)
        assert len(grads) == len(grads_ref) == 5
        for i, (g, w) in enumerate(zip(grads, grads_ref)):
            assert (g is None) == (w is None)
            if g is not None:
                assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
                if i > 0:  # the memory gradients are accumulated into zeros: a replay zero-fills them too
                    assert bool((w == 0).all()) and bool((g == 0).all())
        first = next(i for i, w in enumerate(grads_ref) if w is not None)
        _same_launches(launches, grads[first], planned, grads_ref[first], tensors)
    assert len(plan_cache._CACHE) == 1


def test_key_sees_everything_the_plan_reads(cache_on_cpu):
    inputs, offsets = _inputs(dtype=torch.float32)
    base = (*inputs, offsets, "affine", 0.5, 1e-2)
    variants = [
        (*inputs, offsets, "softmax", 0.5, 1e-2),
        (*inputs, offsets, "affine", -0.5, 1e-2),
        (*inputs, offsets, "affine", 0.5, 2e-2),
        (*inputs, [32, 0], "affine", 0.5, 1e-2),
        (inputs[0], inputs[1].t().contiguous().t(), *inputs[2:], offsets, "affine", 0.5, 1e-2),  # weight strides
    ]
    plan_cache.plan_linear(*base)
    for v in variants:
        y_ref, planned = launchers.plan_linear(*v)
        y, replayed = plan_cache.plan_linear(*v)
        _same_launches(replayed, y, planned, y_ref, v[:7])
    assert len(plan_cache._CACHE) == 1 + len(variants)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (not old, old):  # fp32 dot precision follows allow_tf32 at call time
            torch.backends.cuda.matmul.allow_tf32 = flag
            y_ref, planned = launchers.plan_linear(*base)
            y, replayed = plan_cache.plan_linear(*base)
            _same_launches(replayed, y, planned, y_ref, inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_inputs_the_planner_copies_are_never_replayed(cache_on_cpu):
    inputs, offsets = _inputs()
    x_strided = torch.randn(2, 32, 5).to(torch.bfloat16).transpose(1, 2)  # rows cannot be viewed: copied
    bank_t = inputs[5].transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous bank: copied
    for args in ((x_strided, *inputs[1:], offsets, "affine", 1.0, 1e-2),
                 (*inputs[:5], bank_t, inputs[6], offsets, "affine", 1.0, 1e-2)):
        y_ref, planned = launchers.plan_linear(*args)
        y, launches = plan_cache.plan_linear(*args)
        assert [la.name for la in launches] == [la.name for la in planned]  # planned afresh
    assert plan_cache._CACHE == {}


def test_an_uncacheable_signature_plans_once_per_call_after_the_first(cache_on_cpu, monkeypatch):
    # The probes' verdict depends only on the key: later calls skip the probe planning.
    inputs, offsets = _inputs()
    x_strided = torch.randn(2, 32, 5).to(torch.bfloat16).transpose(1, 2)  # copied by the planner
    args = (x_strided, *inputs[1:], offsets, "affine", 1.0, 1e-2)
    plan_cache.plan_linear(*args)
    calls = []
    real = launchers.plan_linear
    monkeypatch.setattr(launchers, "plan_linear", lambda *a: calls.append(a) or real(*a))
    for _ in range(2):
        plan_cache.plan_linear(*args)
    assert len(calls) == 2 and all(c[0] is x_strided for c in calls)
    assert plan_cache._CACHE == {}


def test_aliased_inputs_get_the_planners_mapping(cache_on_cpu):
    # fp32 with the CLS token of x as the query (MIRA's identity query): query and x share a pointer.
    inputs, offsets = _inputs(dtype=torch.float32)
    x = inputs[0]
    aliased = [x, *inputs[1:3], x[:, 0], *inputs[4:]]
    # Recorded from a query with the same strides that aliases nothing; then replayed for the alias.
    plan_cache.plan_linear(*inputs[:3], torch.randn(2 * 5 * 32)[: 2 * 5 * 32].as_strided((2, 32), x[:, 0].stride()),
                           *inputs[4:], offsets, "affine", 1.0, 1e-2)
    y_ref, planned = launchers.plan_linear(*aliased, offsets, "affine", 1.0, 1e-2)
    y, replayed = plan_cache.plan_linear(*aliased, offsets, "affine", 1.0, 1e-2)
    _same_launches(replayed, y, planned, y_ref, aliased)
    q_arg = next(r for r in replayed if r.kernel is planned[0].kernel).kwargs["q_ptr"]
    assert q_arg is aliased[3]


def test_a_failed_plan_records_nothing(cache_on_cpu):
    inputs, offsets = _inputs()
    with pytest.raises(KeyError):
        plan_cache.plan_linear(*inputs, offsets, "no-such-separation", 1.0, 1e-2)
    assert plan_cache._CACHE == {}


def test_sweeps_and_other_devices_plan_every_call(cache_on_cpu, monkeypatch):
    inputs, offsets = _inputs()
    with configs.overriding(gemm_groups=1):
        plan_cache.plan_linear(*inputs, offsets, "affine", 1.0, 1e-2)
    monkeypatch.setattr(plan_cache, "DEVICE_TYPES", {"cuda"})
    plan_cache.plan_linear(*inputs, offsets, "affine", 1.0, 1e-2)
    assert plan_cache._CACHE == {}


def test_harness_runs():
    proc = _subprocess.run(["-m", "benchmarks.host_path", "--quick"], interpret=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\ncommit " in proc.stdout, proc.stdout  # which code, and when: the label is optional free text
    for stage in ("op_total", "dispatch", "plan", "plan_cached", "launch_ours", "triton_jit_est"):
        assert f"  {stage} " in proc.stdout, proc.stdout


@pytest.mark.slow
def test_cached_forward_under_the_interpreter_matches_the_reference():
    code = r"""
import torch, mira_kernels as mk
from mira_kernels import reference
from mira_kernels.triton import plan_cache
plan_cache.DEVICE_TYPES.add("cpu")
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 16, generator=g); w = torch.randn(48, 16, generator=g); b = torch.randn(48, generator=g)
q = torch.randn(2, 16, generator=g); k = torch.randn(3, 16, generator=g)
A = torch.randn(3, 2, 2, 16, generator=g) * 0.1; B = torch.randn(3, 2, 16, 2, generator=g) * 0.1
want = reference.mira_linear(*(t.double() for t in (x, w, b, q, k, A, B)), slice_offsets=[0, 32])
g_out = torch.randn(2, 3, 48, generator=g)
leaves = [t.double().requires_grad_() for t in (x, q, k, A, B)]
want_y = reference.mira_linear(leaves[0], w.double(), b.double(), *leaves[1:], slice_offsets=[0, 32])
want_grads = torch.autograd.grad(want_y, leaves, g_out.double())
with mk.use_backend("triton"):
    for _ in range(2):  # the miss, then the hit, of both plans
        ins = [t.clone().requires_grad_() for t in (x, q, k, A, B)]
        y = mk.mira_linear(ins[0], w, b, *ins[1:], slice_offsets=[0, 32])
        assert (y.double() - want).abs().max() < 1e-3, (y.double() - want).abs().max()
        grads = torch.autograd.grad(y, ins, g_out)
        for got, ref in zip(grads, want_grads):
            assert (got.double() - ref).abs().max() < 1e-3, (got.double() - ref).abs().max()
assert len(plan_cache._CACHE) == 2
print("ok")
"""
    proc = _subprocess.run(["-c", code], interpret=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# DIRECT_LAUNCH (opt-in): replays through the compiled kernel, checked here with fakes; on a GPU
# against the ordinary launch.
# ----------------------------------------------------------------------------------------------


class _FakeCompiled:
    packed_metadata = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _FakeJIT:
    def __init__(self, real, log):
        self.fn, self.arg_names, self.log = real.fn, real.arg_names, log

    def __getitem__(self, grid):
        def launch(**kw):
            self.log.append(("jit", grid, kw))
            return _FakeCompiled(self.log)

        return launch


def test_direct_launch_passes_the_binders_arguments(cache_on_cpu, monkeypatch):
    from mira_kernels.triton import kernels

    log: list = []
    for name in ("_mira_retrieve_kernel", "_mira_gemm_kernel", "_mira_shrink_fwd_kernel"):
        monkeypatch.setattr(kernels, name, _FakeJIT(getattr(kernels, name), log))
    monkeypatch.setattr(plan_cache, "DIRECT_LAUNCH", True)
    inputs, offsets = _inputs()
    args = (*inputs, offsets, "affine", 1.0, 1e-2)
    for _ in range(2):
        _, launches = plan_cache.plan_linear(*args)
        launchers.run_all(launches, inputs[0].device)
    n = len(launches)
    assert [entry[0] for entry in log] == ["jit"] * n + ["direct"] * n
    for (_, grid, kw), (_, grid3, positional), launch in zip(log[:n], log[n:], launches):
        assert tuple(grid3) == tuple(grid) + (1,) * (3 - len(grid))
        names = launch.template.arg_names
        assert names == tuple(launch.kernel.arg_names) and len(positional) == len(names)
        for name, value in zip(names, positional):  # the same values, except this call's tensors
            if isinstance(value, torch.Tensor):
                assert value.dtype == kw[name].dtype
            else:
                assert value == kw[name], name
    # An input whose pointer is not 16-byte aligned goes through Triton again (another specialisation).
    log.clear()
    x_odd = torch.empty(inputs[0].numel() + 1, dtype=inputs[0].dtype)[1:].view(inputs[0].shape)
    _, launches = plan_cache.plan_linear(x_odd, *inputs[1:], offsets, "affine", 1.0, 1e-2)
    launchers.run_all(launches, x_odd.device)
    x_launches = sum(1 for la in launches if "x_ptr" in la.kwargs or "in_ptr" in la.kwargs)
    assert [entry[0] for entry in log].count("jit") == x_launches > 0


def test_direct_launch_order_is_tritons_binder_order(cache_on_cpu):
    jit = pytest.importorskip("triton.runtime.jit")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    inputs, offsets = _inputs()
    _, launches = plan_cache.plan_linear(*inputs, offsets, "affine", 1.0, 1e-2)
    for launch in launches:
        kernel = launch.kernel
        binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, _, _ = binder(**launch.kwargs)
        assert tuple(bound) == launch.template.arg_names
        assert all(bound[n] is launch.kwargs[n] for n in bound)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 8])
def test_direct_launch_matches_on_gpu(monkeypatch, dtype, batch):
    import mira_kernels as mk

    plan_cache.clear()
    inputs, offsets = _inputs(B=batch, T=197, d=768, d_out=2304, N=30, dtype=dtype, offsets=(0, 1536))
    inputs = [t.cuda() if t is not None else None for t in inputs]
    x_odd = torch.empty(inputs[0].numel() + 1, dtype=dtype, device="cuda")[1:].view(inputs[0].shape)
    x_odd.copy_(inputs[0])
    with mk.use_backend("triton"):
        want = [mk.mira_linear(x, *inputs[1:], slice_offsets=offsets) for x in (inputs[0], x_odd)]
        monkeypatch.setattr(plan_cache, "DIRECT_LAUNCH", True)
        for _ in range(3):  # the first replay compiles and keeps the kernel, the next ones launch it
            got = [mk.mira_linear(x, *inputs[1:], slice_offsets=offsets) for x in (inputs[0], x_odd)]
            for g, w in zip(got, want):
                assert torch.equal(g, w)
    assert any(lt.compiled for t in plan_cache._CACHE.values() for lt in t.launches)
    plan_cache.clear()


def test_the_key_knows_every_setting_the_planner_reads():
    # A tripwire: the planner's reads of process-wide settings, each of which plan_cache.key holds
    # (allow_tf32 through _precisions, TRITON_INTERPRET through interpreting(), the overrides by
    # bypassing the cache). A new one must join the key, then this list.
    import re
    from pathlib import Path

    root = Path(launchers.__file__).parent
    found = set()
    for name in ("launchers.py", "configs.py"):
        for line in (root / name).read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            found.update(re.findall(r"torch\.backends\.[\w.]+|os\.environ|os\.getenv|torch\.get_\w+|torch\.is_\w+"
                                    r"|_OVERRIDES\[-1\]|_planning_capability\[-1\]", line))
    assert found == {"torch.backends.cuda.matmul.allow_tf32", "os.environ", "_OVERRIDES[-1]",
                     "_planning_capability[-1]"}, found
