"""Every input-validation error of the public ops: the right type, naming the argument and shape.

The checks exist twice (ops.py explains why): in C++ in the op kernels, the only checks of an
eager call, and in Python (mira_kernels/_validation.py), which word the documented error and
check traced calls. Every bad input below is therefore tried three ways: through the public
function (the documented type and message), and straight through the op with a native and a
Python backend (the C++ checks alone must reject it, with the same exception type).
"""

from __future__ import annotations

import pytest
import torch

import mira_kernels as mk
from mira_kernels import _extension, _validation
from tests.mira_inputs import make_inputs

needs_ext = pytest.mark.skipif(not _extension.loaded, reason="the C++ extension did not build")


def call(inp, **kw):
    kw.setdefault("slice_offsets", inp.slice_offsets)
    return mk.mira_linear(*inp.linear_args(), **kw)


def call_op(inp, backend, slice_offsets=None, separation="affine", scale=1.0, eps=mk.DEFAULT_EPS):
    """The public op without its Python wrapper: only the C++ checks stand between input and kernel."""
    offsets = inp.slice_offsets if slice_offsets is None else slice_offsets
    return torch.ops.mira.mira_linear(*inp.linear_args(), offsets, separation, scale, eps, backend)


def base():
    return make_inputs(B=2, T=5, d_in=12, d_out=36, N=4, S=2, r=3, d_s=12, offsets=[0, 24], dtype=torch.float32)


CASES = [
    # (mutation, expected exception, message fragment)
    (lambda i: setattr(i, "x", i.x[0]), ValueError, r"x must have shape \(B, T, d_in\)"),
    (lambda i: setattr(i, "x", i.x.int()), TypeError, "x must be float32"),
    (lambda i: setattr(i, "weight", i.weight[:, :5]), ValueError, "weight must have shape .* d_in"),
    (lambda i: setattr(i, "weight", i.weight[0]), ValueError, r"weight must have shape \(d_out, d_in\)"),
    (lambda i: setattr(i, "weight", i.weight.double()), TypeError, "weight has dtype torch.float64"),
    (lambda i: setattr(i, "bias", i.bias[:7]), ValueError, "bias must have shape"),
    (lambda i: setattr(i, "bias", i.bias[None]), ValueError, r"bias must have shape \(d_out,\)"),
    (lambda i: setattr(i, "bias", i.bias.half()), TypeError, "bias has dtype"),
    (lambda i: setattr(i, "query", i.query[:1]), ValueError, "query must have shape .* B"),
    (lambda i: setattr(i, "query", i.query[:, :5]), ValueError, "query must have shape .* d_k"),
    (lambda i: setattr(i, "query", i.query[0]), ValueError, r"query must have shape \(B, d_k\)"),
    (lambda i: setattr(i, "keys", i.keys[0]), ValueError, r"keys must have shape \(N, d_k\)"),
    (lambda i: setattr(i, "bank_a", i.bank_a[:2]), ValueError, "bank_a must have shape .* N"),
    (lambda i: setattr(i, "bank_a", i.bank_a[..., :5]), ValueError, "bank_a must have shape .* d_in"),
    (lambda i: setattr(i, "bank_a", i.bank_a[0]), ValueError, r"bank_a must have shape \(N, S, r, d_in\)"),
    (lambda i: setattr(i, "bank_a", i.bank_a[:, :0]), ValueError, "S >= 1 slices"),
    (lambda i: setattr(i, "bank_b", i.bank_b[:2]), ValueError, "bank_b must have shape .* N"),
    (lambda i: setattr(i, "bank_b", i.bank_b[:, :1]), ValueError, "bank_b must have shape .* S"),
    (lambda i: setattr(i, "bank_b", i.bank_b[..., :2]), ValueError, "bank_b must have shape .* r"),
    (lambda i: setattr(i, "bank_b", i.bank_b[0]), ValueError, "bank_b must have shape"),
    (lambda i: setattr(i, "keys", i.keys.double()), TypeError, "keys has dtype torch.float64"),
    (lambda i: setattr(i, "bank_b", i.bank_b.double()), TypeError, "bank_b has dtype torch.float64"),
    (lambda i: setattr(i, "bank_a", i.bank_a.int()), TypeError, "bank_a has dtype torch.int32"),
    (lambda i: setattr(i, "bank_a", i.bank_a[:, :, :0]), ValueError, "rank r >= 1"),
]


@pytest.mark.parametrize("mutate, exc, msg", CASES)
def test_shape_and_dtype_errors(mutate, exc, msg):
    inp = base()
    mutate(inp)
    with pytest.raises(exc, match=msg) as info:
        call(inp)
    # The documented error alone, not chained to the kernel's (the wrapper re-checks in Python).
    assert info.value.__context__ is None and info.value.__cause__ is None


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mutate, exc, msg", CASES)
def test_op_kernel_rejects_what_python_rejects(mutate, exc, msg, backend):
    inp = base()
    mutate(inp)
    with pytest.raises(exc):
        call_op(inp, backend)


@pytest.mark.parametrize("mutate, exc, msg", CASES)
def test_python_checks_alone_reject_it(mutate, exc, msg, without_extension):
    inp = base()
    mutate(inp)
    with pytest.raises(exc, match=msg):
        call(inp)


SLICE_CASES = [
    ([0], ValueError, "slice_offsets has 1 entries but .* S = 2"),
    ([0, 30], ValueError, r"slice \[30, 42\) .* must fit in d_out = 36"),
    ([-1, 24], ValueError, "must fit"),
    ([0, 6], ValueError, "overlapping"),
    ([24, 18], ValueError, "overlapping"),
]


@pytest.mark.parametrize("offsets, exc, msg", [*SLICE_CASES, ([0, 1.5], TypeError, "slice_offsets must be a sequence"),
                                               ([True, 8], TypeError, "got bools"),
                                               ((0, False), TypeError, "got bools")])
def test_slice_errors(offsets, exc, msg):
    with pytest.raises(exc, match=msg):
        call(base(), slice_offsets=offsets)


@pytest.mark.parametrize("offsets, exc, msg", SLICE_CASES)
def test_python_checks_alone_reject_bad_slices(offsets, exc, msg, without_extension):
    with pytest.raises(exc, match=msg):
        call(base(), slice_offsets=offsets)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("offsets, exc, msg", SLICE_CASES)
def test_op_kernel_rejects_bad_slices(offsets, exc, msg, backend):
    with pytest.raises(exc):
        call_op(base(), backend, slice_offsets=offsets)


def _offset_forms():
    np = pytest.importorskip("numpy")
    # The eager path handed lists and tuples to torch's int[] parser, which truncates numpy float32
    # scalars and float tensors (15.9 -> 15) and reads bool scalars as 0 / 1; the Python checks refused
    # some of these, and sets (hash order) and dicts (their keys) got through both.
    bad = {
        "float list": lambda: [0.0, 24.0],
        "np.float32 tuple": lambda: (np.float32(0), np.float32(23.9)),
        "np.float64 list": lambda: [np.float64(0), np.float64(24)],
        "0-d float tensors": lambda: [torch.tensor(0.0), torch.tensor(23.9)],
        "0-d complex tensors": lambda: [torch.tensor(0j), torch.tensor(24 + 0j)],
        "1-element int tensors": lambda: [torch.tensor([0]), torch.tensor([24])],
        "1-element float tensors": lambda: [torch.tensor([0.0]), torch.tensor([24.0])],
        "np.bool_ list": lambda: [np.bool_(True), np.bool_(False)],
        "0-d bool tensors": lambda: [torch.tensor(True), torch.tensor(False)],
        "0-d bool arrays": lambda: [np.array(True), np.array(False)],
        "bool tensor": lambda: torch.tensor([True, False]),
        "bool array": lambda: np.array([True, False]),
        "float tensor": lambda: torch.tensor([0.0, 24.0]),
        "float array": lambda: np.array([0.0, 24.0]),
        "2-D tensor": lambda: torch.tensor([[0], [24]]),
        "2-D array": lambda: np.array([[0], [24]]),
        "set": lambda: {0, 24},
        "dict": lambda: {0: "q", 24: "v"},
        "generator": lambda: (o for o in (0, 24)),
        "iterator": lambda: iter([0, 24]),
        "str": lambda: "0,24",
    }
    good = {
        "list": lambda: [0, 24],
        "tuple": lambda: (0, 24),
        "range": lambda: range(0, 48, 24),
        "numpy ints": lambda: [np.int64(0), np.int32(24)],
        "int array": lambda: np.array([0, 24]),
        "0-d int arrays": lambda: (np.array(0), np.array(24)),
        "int tensor": lambda: torch.tensor([0, 24]),
        "int32 tensor": lambda: torch.tensor([0, 24], dtype=torch.int32),
        "0-d int tensors": lambda: [torch.tensor(0), torch.tensor(24)],
        "torch.Size": lambda: torch.Size([0, 24]),
    }
    return bad, good


_BAD_OFFSETS, _GOOD_OFFSETS = _offset_forms()
# "eager": the op's C++ checks first (Python only on failure); "reference": the same through the Python
# router; "check_finite": the Python checks first (as under autocast and torch.compile).
_OFFSET_PATHS = ["eager", "reference", "check_finite"]


def _offsets_inputs():
    # Slices of width 1: the offsets a bool or a truncated float would become ([1, 0], [0, 23]) are valid
    # too, so only the type check can refuse them.
    return make_inputs(B=2, T=5, d_in=12, d_out=36, N=4, S=2, r=3, d_s=1, offsets=[0, 24], dtype=torch.float32)


def _offsets_path(path):
    import contextlib

    return {"eager": contextlib.nullcontext(), "reference": mk.use_backend("reference"),
            "check_finite": mk.check_finite()}[path]


@pytest.mark.parametrize("path", _OFFSET_PATHS)
@pytest.mark.parametrize("form", list(_BAD_OFFSETS))
def test_offsets_that_are_not_a_sequence_of_ints_are_refused_on_every_path(form, path):
    inp = _offsets_inputs()
    with _offsets_path(path):
        with pytest.raises(TypeError, match="slice_offsets must be a sequence of ints"):
            call(inp, slice_offsets=_BAD_OFFSETS[form]())
        out = torch.zeros(2, 5, 36)
        with pytest.raises(TypeError, match="slice_offsets must be a sequence of ints"):
            mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=_BAD_OFFSETS[form]())
        assert torch.equal(out, torch.zeros(2, 5, 36))


@pytest.mark.parametrize("form", list(_BAD_OFFSETS))
def test_python_checks_alone_refuse_offsets_that_are_not_ints(form, without_extension):
    with pytest.raises(TypeError, match="slice_offsets must be a sequence of ints"):
        call(_offsets_inputs(), slice_offsets=_BAD_OFFSETS[form]())


@pytest.mark.parametrize("path", _OFFSET_PATHS)
@pytest.mark.parametrize("form", list(_GOOD_OFFSETS))
def test_every_integer_form_of_the_offsets_gives_the_list_of_ints_result(form, path):
    inp = _offsets_inputs()
    with _offsets_path(path):
        want = call(inp, slice_offsets=[0, 24])
        assert torch.equal(call(inp, slice_offsets=_GOOD_OFFSETS[form]()), want)
        out = torch.zeros(2, 5, 36)
        mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=_GOOD_OFFSETS[form]())
        want_out = torch.zeros(2, 5, 36)
        mk.mira_adapter_(want_out, *inp.adapter_args(), slice_offsets=[0, 24])
        assert torch.equal(out, want_out)


def test_slices_may_touch_and_be_unordered():
    # [12, 0] with d_s = 12: slice 0 writes [12, 24), slice 1 [0, 12), touching, in reverse order.
    inp = base()
    got = call(inp, slice_offsets=[12, 0])
    want = mk.reference.mira_linear(*inp.to(torch.float64).linear_args(), slice_offsets=[12, 0])
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # Each bank's slice lands at its own offset: swapping the banks' slices swaps the offsets.
    swapped = base()
    swapped.bank_a, swapped.bank_b = inp.bank_a.flip(1), inp.bank_b.flip(1)
    torch.testing.assert_close(call(swapped, slice_offsets=[0, 12]), got, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_rules():
    inp = base()
    half = inp.to(torch.bfloat16, torch.float32)
    call(half)  # 16-bit x with fp32 memory side: allowed
    f32 = inp.to(torch.float32)
    f32.keys = f32.keys.bfloat16()
    with pytest.raises(TypeError, match="keys has dtype torch.bfloat16; with x of dtype torch.float32 it must be"):
        call(f32)
    f64 = inp.to(torch.float64)
    f64.query = f64.query.float()
    with pytest.raises(TypeError, match="query has dtype torch.float32"):
        call(f64)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_16bit_banks_allowed_with_float32_compute(x_dtype, bank_dtype):
    # Contract section 4: with float32 compute the banks may be stored in 16 bits, each on its own.
    inp = base().to(x_dtype, torch.float32 if x_dtype != torch.float32 else None)
    inp.bank_a = inp.bank_a.to(bank_dtype)
    y = call(inp)
    assert y.dtype == x_dtype and torch.isfinite(y).all()
    inp.bank_b = inp.bank_b.to(bank_dtype)
    assert torch.isfinite(call(inp)).all()


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_16bit_banks_refused_with_float64_x(bank_dtype, backend):
    # float64 x computes in float64, where a 16-bit bank would be the one low-precision operand:
    # refused, naming the rule, by the public function and by the op's C++ checks.
    inp = base().to(torch.float64)
    inp.bank_b = inp.bank_b.to(bank_dtype)
    if backend is None:
        with pytest.raises(TypeError, match="bank_b has dtype .*it must be torch.float64 .16-bit banks need float32"):
            call(inp)
    elif _extension.loaded:
        with pytest.raises(TypeError, match="bank_b"):
            call_op(inp, backend)


SCALAR_CASES = [
    (dict(separation="cosine"), ValueError, "unknown separation 'cosine'"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
]


@pytest.mark.parametrize("kw, exc, msg", SCALAR_CASES)
def test_scalar_argument_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        call(base(), **kw)


@pytest.mark.parametrize("kw, exc, msg", SCALAR_CASES)
def test_python_checks_alone_reject_bad_scalars(kw, exc, msg, without_extension):
    with pytest.raises(exc, match=msg):
        call(base(), **kw)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kw, exc, msg", SCALAR_CASES)
def test_op_kernel_rejects_bad_scalars(kw, exc, msg, backend):
    with pytest.raises(exc):
        call_op(base(), backend, **kw)


def test_non_tensor_argument_gets_the_documented_error():
    inp = base()
    inp.keys = inp.keys.tolist()
    with pytest.raises(TypeError, match="keys must be a Tensor of shape"):
        call(inp)


@needs_ext
def test_eager_calls_leave_the_checks_to_the_kernel(monkeypatch):
    # The eager path's point (ops.py): valid calls never run the Python checks.
    def fail(*args, **kwargs):
        raise AssertionError("Python checks ran on a valid eager call")

    monkeypatch.setattr(_validation, "check_mira_linear", fail)
    monkeypatch.setattr(_validation, "check_mira_adapter", fail)
    inp = base()
    y = call(inp)
    mk.mira_adapter_(y, *inp.adapter_args(), slice_offsets=inp.slice_offsets)


def test_kernel_errors_that_are_not_argument_errors_pass_through():
    # A backend that cannot run is not an argument fault: the RuntimeError reaches the caller.
    with mk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was requested for cpu tensors"):
        call(base())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch():
    inp = base()
    inp.keys = inp.keys.cuda()
    with pytest.raises(ValueError, match="keys is on cuda"):
        call(inp)


@pytest.mark.parametrize("name", ["weight", "bias", "query", "keys", "bank_a", "bank_b"])
def test_device_mismatch_meta(name):
    # A meta tensor is a second device on any machine. Among CPU inputs it sends the op to its fake
    # kernel, not the C++ one: the Python checks are all that stop it returning an empty CPU tensor (with
    # query's and keys' device check disabled, both calls below returned one).
    inp = base()
    setattr(inp, name, getattr(inp, name).to("meta"))
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        call(inp)
    if _extension.loaded:
        with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
            call_op(inp, "cpu")


ADAPTER_CASES = [
    (lambda: torch.zeros(2, 4, 36), ValueError, r"out must have shape \(B, T, d_out\) with T"),
    (lambda: torch.zeros(3, 5, 36), ValueError, r"out must have shape \(B, T, d_out\) with B"),
    (lambda: torch.zeros(2, 5), ValueError, r"out must have shape \(B, T, d_out\)"),
    (lambda: torch.zeros(2, 5, 36, dtype=torch.float64), TypeError, "out has dtype torch.float64"),
    (lambda: torch.zeros(2, 5, 30), ValueError, "must fit in d_out = 30"),
    (lambda: torch.zeros(2, 5, 36, device="meta"), ValueError, "out is on meta but x is on cpu"),
]


@pytest.mark.parametrize("make_out, exc, msg", ADAPTER_CASES)
def test_adapter_errors(make_out, exc, msg):
    inp = base()
    with pytest.raises(exc, match=msg):
        mk.mira_adapter_(make_out(), *inp.adapter_args(), slice_offsets=inp.slice_offsets)


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("make_out, exc, msg", [c for c in ADAPTER_CASES if "meta" not in c[2]])
def test_op_kernel_rejects_bad_adapter_outputs(make_out, exc, msg, backend):
    inp = base()
    with pytest.raises(exc):
        torch.ops.mira.mira_adapter_(make_out(), *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, 0.01, backend)


@needs_ext
def test_op_kernel_rejects_bad_backward_arguments():
    inp = base()
    grad = torch.ones(2, 5, 36)
    args = (inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets, "affine", 1.0, 0.01,
            [True] * 5, "cpu")
    torch.ops.mira.mira_linear_backward(grad, *args)  # valid
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.mira.mira_linear_backward(grad[:, :4], *args)
    with pytest.raises(TypeError, match="grad_out has dtype"):
        torch.ops.mira.mira_linear_backward(grad.double(), *args)
    with pytest.raises(ValueError, match="bank_a must have shape"):
        torch.ops.mira.mira_linear_backward(grad, *args[:4], inp.bank_a[:1], *args[5:])


def test_retrieval_weights_errors():
    q, k = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="share d_k"):
        mk.retrieval_weights(q, k[:, :4])
    with pytest.raises(ValueError, match="unknown separation"):
        mk.retrieval_weights(q, k, separation="max")
    with pytest.raises(TypeError, match="query must be a floating tensor"):
        mk.retrieval_weights(q.long(), k)
    with pytest.raises(ValueError, match=r"keys must have shape \(N, d_k\)"):
        mk.retrieval_weights(q, k[0])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("name", ["query", "keys"])
def test_retrieval_weights_refuse_float8_naming_the_argument_and_the_dtypes(name, dtype):
    # Floating, but not a dtype the cosines are computed in: it failed deep in PyTorch
    # ("max_values_cpu" not implemented for Float8_e4m3fn), where mira_linear names the rule.
    tensors = {"query": torch.randn(2, 8), "keys": torch.randn(3, 8)}
    tensors[name] = tensors[name].to(dtype)
    with pytest.raises(TypeError, match=f"{name} must be a floating tensor .*float32, float64, float16 or bfloat16"):
        mk.retrieval_weights(tensors["query"], tensors["keys"])


def test_separation_types_scalars_and_fractions_are_judged_alike_on_every_path():
    # A review found bytes accepted by the eager path only, None / 1 reported as ValueError, an
    # int scale beyond float's range escaping as OverflowError, and retrieval_weights failing on a
    # Fraction eps that mira_linear accepts.
    from fractions import Fraction

    inp = make_inputs(dtype=torch.float32)
    args = inp.linear_args()
    for bad in (b"affine", None, 1):
        with pytest.raises(TypeError, match="separation must be a str"):
            mk.mira_linear(*args, slice_offsets=inp.slice_offsets, separation=bad)
        with pytest.raises(TypeError, match="separation must be a str"):
            mk.retrieval_weights(inp.query, inp.keys, separation=bad)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        mk.mira_linear(*args, slice_offsets=inp.slice_offsets, scale=10**400)
    torch.testing.assert_close(mk.retrieval_weights(inp.query, inp.keys, eps=Fraction(1, 100)),
                               mk.retrieval_weights(inp.query, inp.keys, eps=0.01), rtol=0, atol=0)


def test_slice_offsets_refuse_bytes_on_every_path():
    # bytes are a sequence of ints: b"\x00\x10" was read as slice_offsets [0, 16] (found by probing).
    inp = make_inputs(dtype=torch.float32)
    for bad in (b"\x00\x10", bytearray(b"\x00\x10"), memoryview(b"\x00\x10")):
        with pytest.raises(TypeError, match="slice_offsets must be a sequence of ints"):
            mk.mira_linear(*inp.linear_args(), slice_offsets=bad)
        with pytest.raises(TypeError, match="slice_offsets must be a sequence of ints"):
            mk.mira_adapter_(torch.zeros(inp.x.shape[:2] + (inp.weight.shape[0],)), inp.x, inp.query, inp.keys,
                             inp.bank_a, inp.bank_b, slice_offsets=bad)


def test_check_finite_keeps_a_full_graph_under_compile():
    inp = make_inputs(dtype=torch.float32)

    def f(x):
        return mk.mira_linear(x, *inp.linear_args()[1:], slice_offsets=inp.slice_offsets)

    with mk.check_finite():
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(compiled(inp.x), f(inp.x))
        with pytest.raises(RuntimeError, match="x contains inf or NaN"):
            compiled(inp.x * float("nan"))
