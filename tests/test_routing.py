"""Backend routing: defaults, forcing (context manager and MIRA_BACKEND), fallback, unavailable backends."""

from __future__ import annotations

import warnings

import pytest
import torch

import mira_kernels as mk
from mira_kernels import _extension, backends, ops, reference
from tests.mira_inputs import make_inputs, max_err


def test_available_backends_cpu():
    names = mk.available_backends("cpu")
    assert names[0] == "reference" and set(names) <= {"reference", "cpu"}
    assert ("cpu" in names) == _extension.has_kernel("_cpu_mira_linear", "CPU")


def test_cuda_backends_need_a_device():
    if not torch.cuda.is_available():
        assert mk.available_backends("cuda") == []
    else:
        assert "reference" in mk.available_backends("cuda")


def test_default_cpu_backend():
    want = "cpu" if "cpu" in mk.available_backends("cpu") else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mk.resolve_backend("cpu") == want


def test_use_backend_nests_and_restores():
    with mk.use_backend("reference"):
        assert mk.resolve_backend("cpu") == "reference"
        with mk.use_backend(None):
            assert mk.resolve_backend("cpu") in mk.available_backends("cpu")
        assert mk.resolve_backend("cpu") == "reference"


def test_environment_variable_read_at_call_time(monkeypatch):
    monkeypatch.setenv("MIRA_BACKEND", "reference")
    assert mk.resolve_backend("cpu") == "reference"
    monkeypatch.setenv("MIRA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' was requested for cpu tensors but cannot run"):
        mk.resolve_backend("cpu")
    with mk.use_backend("reference"):  # the context manager wins over the environment
        assert mk.resolve_backend("cpu") == "reference"


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_unavailable_backend_raises(name):
    inp = make_inputs(dtype=torch.float32)
    with mk.use_backend(name), pytest.raises(RuntimeError, match=f"'{name}' was requested"):
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


def test_unknown_backend_raises():
    # use_backend judges the name at once (the rule of every MIRA_* name, mira_kernels/_config.py).
    with pytest.raises(ValueError, match="unknown MIRA backend 'numba'"), mk.use_backend("numba"):
        mk.resolve_backend("cpu")


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    impl = backends.implementation("reference")
    original = impl.mira_linear
    monkeypatch.setattr(impl, "mira_linear", lambda *a: calls.append(1) or original(*a))
    inp = make_inputs(dtype=torch.float32)
    with mk.use_backend("reference"):
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert calls == [1]


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mira::")}


@pytest.mark.skipif(not _extension.has_kernel("_cpu_mira_linear", "CPU"), reason="the CPU kernel is not built")
def test_native_backend_skips_the_python_router():
    # backend="cpu" on a CPU tensor: the public op's C++ kernel calls the private op directly;
    # any other name goes through the Python router (_routed_*), for every public op.
    inp = make_inputs(dtype=torch.float32).requires_grad_("query")
    out = torch.zeros(2, 5, 36)
    for backend, routed in (("cpu", False), ("reference", True), ("auto", True)):
        def run(backend=backend):
            y = torch.ops.mira.mira_linear(*inp.linear_args(), inp.slice_offsets, "affine", 1.0, 1e-2, backend)
            y.sum().backward()
            with torch.no_grad():
                torch.ops.mira.mira_adapter_(out, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, 1e-2,
                                             backend)

        ran = _ops_run(run)
        for op in ("mira_linear", "mira_linear_backward", "mira_adapter_"):
            assert f"mira::{op}" in ran
            assert (f"mira::_routed_{op}" in ran) == routed, (backend, op, ran)
            assert (f"mira::_cpu_{op}" in ran) == (backend != "reference"), (backend, op, ran)


def test_missing_native_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    inp = make_inputs(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="falling back to the plain-PyTorch reference"):
        y = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second call: silent
        y2 = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    want = reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert max_err(y, want) == 0 and max_err(y2, want) == 0
    with mk.use_backend("cpu"), pytest.raises(RuntimeError, match="built without its CPU kernel"):
        mk.resolve_backend("cpu")


def test_missing_extension_falls_back_to_reference(monkeypatch):
    # No _C at all: the public functions still work through the reference, and autograd flows.
    monkeypatch.setattr(_extension, "loaded", False)
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    inp = make_inputs(dtype=torch.float64).requires_grad_("query")
    with pytest.warns(RuntimeWarning, match="no native backend"):
        y = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    y.sum().backward()
    assert inp.query.grad is not None
    out = torch.zeros(2, 5, 36, dtype=torch.float64)
    with torch.no_grad():
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    assert out.abs().sum() > 0


def test_backend_is_fixed_at_trace_time_under_compile():
    inp = make_inputs(dtype=torch.float32)
    seen = []
    impl = backends.implementation("reference")
    original = impl.mira_linear

    def spy(*a):
        seen.append("reference")
        return original(*a)

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: mk.mira_linear(*a, slice_offsets=inp.slice_offsets), fullgraph=True)
    try:
        impl.mira_linear = spy
        with mk.use_backend("reference"):
            compiled(*inp.linear_args())
        compiled(*inp.linear_args())  # outside the block: same graph, still the traced backend
        assert seen == ["reference", "reference"]
    finally:
        impl.mira_linear = original
        torch._dynamo.reset()


def test_build_info():
    info = mk.build_info()
    assert info["extension_loaded"] is True, info["load_error"]
    assert info["torch"] == torch.__version__


@pytest.mark.skipif(not _extension.has_kernel("_cpu_mira_linear", "CPU"), reason="the CPU kernel is not built")
def test_eager_shortcut_agrees_with_resolve_backend(monkeypatch):
    # The public functions' eager path resolves the common CPU case itself (ops._eager_backend);
    # it must give resolve_backend's answer whatever is requested.
    x = torch.zeros(1, 1, 4)
    for requested in (None, "cpu", "reference"):
        with mk.use_backend(requested):
            assert ops._eager_backend(x) == mk.resolve_backend("cpu")
    monkeypatch.setenv("MIRA_BACKEND", "reference")
    assert ops._eager_backend(x) == mk.resolve_backend("cpu") == "reference"


@pytest.mark.parametrize("forced_by", ["use_backend", "MIRA_BACKEND"])
@pytest.mark.parametrize("name", ["cpu", "reference", "triton", "cuda"])
def test_a_forced_backend_does_not_stop_meta_tensors(name, forced_by, monkeypatch):
    # Meta tensors run the ops' fake kernels (shape inference), whatever backend is forced (contract
    # section 6); a forced "cpu" refused them: "backend 'cpu' was requested for meta tensors but cannot run".
    inp = make_inputs(dtype=torch.float32)
    x, weight, bias, query, keys, bank_a, bank_b = (t.to("meta") for t in inp.linear_args())
    out = torch.empty(2, 5, 36, device="meta")
    if forced_by == "MIRA_BACKEND":
        monkeypatch.setenv("MIRA_BACKEND", name)
        forced = mk.use_backend(None)
    else:
        forced = mk.use_backend(name)
    with forced:
        assert mk.resolve_backend("meta") == "reference"
        y = mk.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets)
        assert y.device.type == "meta" and y.shape == (2, 5, 36)
        assert mk.mira_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets=inp.slice_offsets) is out
        with pytest.raises(ValueError, match="bank_a must have shape"):  # still checked
            mk.mira_linear(x, weight, bias, query, keys, bank_a[:1], bank_b, slice_offsets=inp.slice_offsets)
