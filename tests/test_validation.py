"""Every input-validation error of the public ops: the right type, naming the argument and shape."""

from __future__ import annotations

import pytest
import torch

import mira_kernels as mk
from tests.mira_inputs import make_inputs


def call(inp, **kw):
    kw.setdefault("slice_offsets", inp.slice_offsets)
    return mk.mira_linear(*inp.linear_args(), **kw)


def base():
    return make_inputs(B=2, T=5, d_in=12, d_out=36, N=4, S=2, r=3, d_s=12, offsets=[0, 24], dtype=torch.float32)


CASES = [
    # (mutation, expected exception, message fragment)
    (lambda i: setattr(i, "x", i.x[0]), ValueError, r"x must have shape \(B, T, d_in\)"),
    (lambda i: setattr(i, "x", i.x.int()), TypeError, "x must be float32"),
    (lambda i: setattr(i, "weight", i.weight[:, :5]), ValueError, "weight must have shape .* d_in"),
    (lambda i: setattr(i, "weight", i.weight.double()), TypeError, "weight has dtype torch.float64"),
    (lambda i: setattr(i, "bias", i.bias[:7]), ValueError, "bias must have shape"),
    (lambda i: setattr(i, "bias", i.bias.half()), TypeError, "bias has dtype"),
    (lambda i: setattr(i, "query", i.query[:1]), ValueError, "query must have shape .* B"),
    (lambda i: setattr(i, "query", i.query[:, :5]), ValueError, "query must have shape .* d_k"),
    (lambda i: setattr(i, "keys", i.keys[0]), ValueError, r"keys must have shape \(N, d_k\)"),
    (lambda i: setattr(i, "bank_a", i.bank_a[:2]), ValueError, "bank_a must have shape .* N"),
    (lambda i: setattr(i, "bank_a", i.bank_a[..., :5]), ValueError, "bank_a must have shape .* d_in"),
    (lambda i: setattr(i, "bank_b", i.bank_b[:, :1]), ValueError, "bank_b must have shape .* S"),
    (lambda i: setattr(i, "bank_b", i.bank_b[..., :2]), ValueError, "bank_b must have shape .* r"),
    (lambda i: setattr(i, "bank_b", i.bank_b[0]), ValueError, "bank_b must have shape"),
    (lambda i: setattr(i, "keys", i.keys.double()), TypeError, "keys has dtype torch.float64"),
    (lambda i: setattr(i, "bank_a", i.bank_a[:, :, :0]), ValueError, "rank r >= 1"),
]


@pytest.mark.parametrize("mutate, exc, msg", CASES)
def test_shape_and_dtype_errors(mutate, exc, msg):
    inp = base()
    mutate(inp)
    with pytest.raises(exc, match=msg):
        call(inp)


@pytest.mark.parametrize(
    "offsets, exc, msg",
    [
        ([0], ValueError, "slice_offsets has 1 entries but .* S = 2"),
        ([0, 30], ValueError, r"slice \[30, 42\) .* must fit in d_out = 36"),
        ([-1, 24], ValueError, "must fit"),
        ([0, 6], ValueError, "overlapping"),
        ([0, 1.5], TypeError, "slice_offsets must be a sequence of ints"),
    ],
)
def test_slice_errors(offsets, exc, msg):
    with pytest.raises(exc, match=msg):
        call(base(), slice_offsets=offsets)


def test_slices_may_touch_and_be_unordered():
    inp = base()
    call(inp, slice_offsets=[12, 0])


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


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        (dict(separation="cosine"), ValueError, "unknown separation 'cosine'"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
    ],
)
def test_scalar_argument_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        call(base(), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch():
    inp = base()
    inp.keys = inp.keys.cuda()
    with pytest.raises(ValueError, match="keys is on cuda"):
        call(inp)


def test_device_mismatch_meta():
    # A meta tensor is a second device on any machine.
    inp = base()
    inp.bank_b = inp.bank_b.to("meta")
    with pytest.raises(ValueError, match="bank_b is on meta but x is on cpu"):
        call(inp)


def test_adapter_errors():
    inp = base()
    with pytest.raises(ValueError, match=r"out must have shape \(B, T, d_out\) with T"):
        mk.mira_adapter_(torch.zeros(2, 4, 36), *inp.adapter_args(), slice_offsets=inp.slice_offsets)
    with pytest.raises(TypeError, match="out has dtype torch.float64"):
        mk.mira_adapter_(torch.zeros(2, 5, 36, dtype=torch.float64), *inp.adapter_args(), slice_offsets=[0, 24])
    with pytest.raises(ValueError, match="must fit in d_out = 30"):
        mk.mira_adapter_(torch.zeros(2, 5, 30), *inp.adapter_args(), slice_offsets=[0, 24])


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
