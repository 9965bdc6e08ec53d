"""The GPU precision rules (docs/contract.md section 11): each rule's CPU emulation stays inside its bound.

``mira_kernels.precision.emulate`` rounds the operands exactly where a GPU path does (TF32
truncation, 16-bit factors and h, a base rounded before the adapter); ``bound`` is the rule's
elementwise error bound against the float64 reference. Both are checked here on the CPU for every
rule, in the weight regimes that stress the op, and the bound is checked to be tight enough to
mean something (the emulation's error reaches a sizeable part of it, and it is far below |y|).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mira_kernels import precision, reference
from tests.mira_inputs import make_inputs

SHAPE = dict(B=3, T=9, d_in=64, d_out=96, N=6, S=2, r=4, d_s=32, offsets=[0, 64])
X_DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16,
           "bf16": torch.bfloat16, "cuda-16bit": torch.bfloat16, "cuda-fp32-tf32": torch.float32}


def _inputs(rule_name, regime, seed):
    dtype = X_DTYPE[rule_name]
    mem = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return make_inputs(**SHAPE, regime=regime, seed=seed).to(dtype, memory_dtype=mem)


def _check(rule_name, regime, separation, seed=0, scale=0.7):
    rule = precision.RULES[rule_name]
    inp = _inputs(rule_name, regime, seed)
    kw = dict(slice_offsets=inp.slice_offsets, separation=separation, scale=scale)
    y = precision.emulate(rule, *inp.linear_args(), **kw)
    assert y.dtype == inp.x.dtype
    exact = reference.mira_linear(*inp.to(torch.float64).linear_args(), **kw)
    limit = precision.bound(rule, *inp.linear_args(), **kw)
    err = (y.double() - exact).abs()
    worst = (err / limit).max().item()
    assert worst <= 1.0, f"{rule_name} {regime} {separation}: error reaches {worst:.2f} x the bound"
    return worst, (limit / exact.abs().max()).max().item()


@pytest.mark.parametrize("rule_name", sorted(precision.RULES))
@pytest.mark.parametrize("regime", ["random", "negative", "near_zero", "one_slot"])
def test_emulation_within_bound(rule_name, regime):
    for separation in ("affine", "softmax"):
        _check(rule_name, regime, separation)


# Per rule: (the least part of the bound the emulation's error must reach over the seeds below, the most
# the bound may be of |y|), each about half (twice) what the rule measures here. One 0.02 for every rule let
# an fp16 bound 8x too loose pass (fp16's output roundoff taken as bf16's: 0.12 of it reached, 1.4e-2 of |y|).
TIGHTNESS = {"fp32": (0.02, 1e-4), "fp32-tf32": (0.1, 0.015), "fp16": (0.5, 0.004), "bf16": (0.5, 0.05),
             "cuda-16bit": (0.4, 0.02), "cuda-fp32-tf32": (0.1, 0.008)}


@pytest.mark.parametrize("rule_name", sorted(TIGHTNESS))
def test_bound_is_tight(rule_name):
    # Over a few seeds the emulation's error reaches a good part of the bound (it is not vacuous),
    # and the bound stays a small fraction of the output (it says something). Softmax weights: the
    # affine ones are ill-conditioned by design when sum(s) is small (the bound then grows with
    # N |w| / |sum s|, correctly, and is no test of tightness).
    worst, relative = max(_check(rule_name, "random", "softmax", seed=s) for s in range(4))
    least_reached, most_relative = TIGHTNESS[rule_name]
    assert worst > least_reached, f"{rule_name}: the bound is {1 / worst:.1f}x the largest error seen"
    assert relative < most_relative, f"{rule_name}: the bound reaches {relative:.2e} x |y|"


def test_rounding_helpers():
    t = torch.tensor([1.0 + 2.0**-12, 1.0 + 2.0**-9, -3.1415926])
    tf = precision.round_to(t, "tf32")
    assert tf[0] == 1.0 and tf[1] == 1.0 + 2.0**-9  # low 13 bits dropped, bit 10 kept
    assert (tf - t).abs().max() <= 2.0**-10 * t.abs().max()
    assert torch.equal(precision.round_to(t, "bf16"), t.to(torch.bfloat16).float())
    assert torch.equal(precision.round_to(t, "exact"), t)


def test_rule_for_each_backend():
    assert precision.rule_for("triton", torch.bfloat16).name == "bf16"
    assert precision.rule_for("triton", torch.float32, allow_tf32=True).name == "fp32-tf32"
    assert precision.rule_for("triton", torch.float32).name == "fp32"
    assert precision.rule_for("cuda", torch.float16).name == "cuda-16bit"
    assert precision.rule_for("cuda", torch.float64).name == "fp64"
    with pytest.raises(TypeError):
        precision.rule_for("triton", torch.int32)


VIT_B = dict(T=197, d_in=768, d_out=2304, N=30, S=2, r=4, d_s=768, offsets=[0, 1536])

#: The bf16 rule until 2026-12-07: h and B_b stored in bf16 for a bf16 expand.
OLD_BF16 = dataclasses.replace(precision.RULES["bf16"], h="bf16", factors_b=None, expand=None)


def _errors(rule, inp, cls_query):
    ex = inp.to(torch.float64)
    q, q64 = (inp.x[:, 0], ex.x[:, 0]) if cls_query else (inp.query, ex.query)
    kw = dict(slice_offsets=inp.slice_offsets)
    want = reference.mira_linear(ex.x, ex.weight, ex.bias, q64, ex.keys, ex.bank_a, ex.bank_b, **kw)
    same = reference.mira_linear(inp.x, inp.weight, inp.bias, q, inp.keys, inp.bank_a, inp.bank_b, **kw)
    emulated = precision.emulate(rule, inp.x, inp.weight, inp.bias, q, inp.keys, inp.bank_a, inp.bank_b, **kw)
    return (same.double() - want).abs().max().item(), (emulated.double() - want).abs().max().item()


def test_bf16_rule_meets_the_house_criterion_where_the_old_rule_did_not():
    # The fourth H200 run (9c67b4a) measured the Triton bf16 forward with the layers' CLS-view query
    # (ViT-B/16 qkv, B = 1, these seeded inputs) at max-abs error 2.031 against PyTorch's 0.980: 2.07x,
    # over the house 2x criterion. The emulation of the rule it ran (h and B_b in bf16) gives the same
    # figure, so the gap was the rule's; the rule now keeps h and B_b in fp32, rounded to nearest TF32
    # for the expand, and emulates within 2x there and across the regimes that stress the op.
    inp = make_inputs(B=1, **VIT_B, dtype=torch.float64).to(torch.bfloat16, memory_dtype=torch.float32)
    own, old = _errors(OLD_BF16, inp, cls_query=True)
    assert abs(own - 0.9795) < 1e-3 and abs(old - 2.031) < 0.03, (own, old)
    worst_old = worst_new = 0.0
    for regime in ("random", "negative", "near_zero", "one_slot"):
        for batch in (1, 8):
            inp = make_inputs(B=batch, **VIT_B, regime=regime, dtype=torch.float64).to(
                torch.bfloat16, memory_dtype=torch.float32)
            for cls_query in (True, False):
                own, old = _errors(OLD_BF16, inp, cls_query)
                _, new = _errors(precision.RULES["bf16"], inp, cls_query)
                assert new <= 2.0 * own, f"{regime} B={batch} cls={cls_query}: {new / own:.2f}x PyTorch's error"
                worst_old, worst_new = max(worst_old, old / own), max(worst_new, new / own)
    assert worst_old > 2.0 and worst_new < 1.8, (worst_old, worst_new)  # the old rule failed here; margin kept
