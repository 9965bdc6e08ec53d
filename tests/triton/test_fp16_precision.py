"""fp16 x on the Triton backend: its precision rule, on the CPU (docs/contract.md section 11, rule `fp16`).

The first GPU run (H200, Triton 3.6) failed three fp16 forward tests of ``test_triton_gpu.py``: at
ViT-B/16 qkv shapes the kernel's error was 4x PyTorch's own (1.05 vs 0.25 at B = 1 with "negative"
affine weights, 4.5e-2 vs 1.5e-2 at B = 2 with random ones). The cause: the expand inside the
projection GEMM took its fp32 operands (h and the mixed B_b) as one TF32 product, which truncates
both to 10 bits. The Triton interpreter cannot show it (its ``tl.dot`` ignores ``input_precision``
and multiplies in fp32), so these tests check the two halves separately:

- the emulation of the rule (operands rounded where the kernels round them) meets the house
  criterion (error vs the float64 spec <= 2x plain PyTorch's at fp16) on exactly those inputs, while
  the arithmetic the GPU ran (one TF32 expand) does not: the inputs tell the two apart; and
- the planned launches of fp16 x (meta tensors, the planner a GPU call runs) use the rule's
  precision in every adapter dot, and bf16 / fp32 keep theirs.

The kernels themselves, with the interpreter's dots made to round as TF32 does, are checked in
``interp_checks.py::test_fp16_adapter_is_fp32_accurate_with_tf32_dots``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mira_kernels import precision, reference
from tests.mira_inputs import assert_close_to_spec, make_inputs, max_err

VIT_B = dict(B=2, T=197, d_in=768, d_out=2304, N=30, S=2, r=4, d_s=768, offsets=[0, 1536])
# The failing GPU cases: test_vit_b_batch_sizes_fp16[1] and test_vit_b_matches_reference[affine-fp16].
CASES = {"negative-B1": dict(B=1, regime="negative"), "random-B2": dict(B=2, regime="random")}

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _fp16_inputs(case):
    inp = make_inputs(**{**VIT_B, "B": CASES[case]["B"]}, regime=CASES[case]["regime"], dtype=torch.float64)
    return inp.to(torch.float16, memory_dtype=torch.float32)


def _spec_and_pytorch(inp, kw):
    want = reference.mira_linear(*inp.to(torch.float64).linear_args(), **kw)
    same = reference.mira_linear(*inp.linear_args(), **kw)
    return want, same


def _one_tf32_expand(inp, kw):
    """The arithmetic the GPU ran before the fix: weights, mixed factors and h in fp32 (their 3xTF32
    launches are about fp32), the expand's operands h and B_b truncated to TF32, fp32 sums, the fp16
    base products exact, one rounding of y."""
    f32 = torch.float32
    weights = reference.retrieval_weights(inp.query, inp.keys, separation=kw["separation"]).to(f32)
    mixed_a, mixed_b = reference.mix_adapters(weights, inp.bank_a.to(f32), inp.bank_b.to(f32))
    h = torch.einsum("btd,bsrd->btsr", inp.x.to(f32), mixed_a)
    delta = kw["scale"] * torch.einsum("btsr,bser->btse", precision.round_to(h, "tf32"),
                                       precision.round_to(mixed_b, "tf32"))
    base = inp.x.to(f32) @ inp.weight.to(f32).T + inp.bias.to(f32)
    return (base + reference._scatter_slices(delta, kw["slice_offsets"], inp.weight.shape[0])).to(inp.x.dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp16_rule_meets_the_house_criterion(case):
    inp = _fp16_inputs(case)
    kw = dict(slice_offsets=inp.slice_offsets, separation="affine", scale=1.0)
    want, same = _spec_and_pytorch(inp, kw)
    rule = precision.rule_for("triton", torch.float16)
    assert rule.name == "fp16"
    y = precision.emulate(rule, *inp.linear_args(), **kw)
    assert_close_to_spec(y, want, same, factor=2.0, what=f"fp16 rule emulation, {case}")
    # The inputs discriminate: one TF32 product in the expand (what the first GPU run measured:
    # 1.05 and 4.5e-2) fails the same criterion.
    old = max_err(_one_tf32_expand(inp, kw), want)
    assert old > 2.0 * max_err(same, want), f"{case}: a TF32 expand ({old:.3e}) would pass; the test cannot fail"


# input_precision of a tl.dot for each operand format of a rule (16-bit operands: the precision
# does not apply, the launchers pass "ieee").
_DOT_PRECISION = {"3xtf32": "tf32x3", "tf32": "tf32", "tf32-rn": "tf32", "fp32": "ieee", "fp64": "ieee",
                  "exact": "ieee", "bf16": "ieee"}
_ADAPTER_KEYS = ("LORA_PRECISION", "EXPAND_PRECISION", "MIX_PRECISION", "SCORE_PRECISION")


def _planned_precisions(dtype, op, batch, fp32_precision="tf32"):
    from mira_kernels.triton import lowering

    case = lowering.Case(op, dtype, batch, 4, 30, fp32_precision=fp32_precision)
    # The GEMM's SPLIT runs a 3xTF32 expand as two TF32 dots of hi / lo halves (same three products).
    # dw_bwd follows the rule's grad_dw and the backward's cosines its grad_scores (both checked in
    # test_grad_precision.py), not the adapter's precision.
    return {(launch.name, key): "tf32x3" if launch.constexprs.get("SPLIT") else launch.constexprs[key]
            for launch in lowering.plan_case(case) for key in _ADAPTER_KEYS if key in launch.constexprs
            and launch.name != "dw_bwd"}


@needs_triton
@pytest.mark.parametrize("op", ["linear", "linear_backward", "adapter_"])
@pytest.mark.parametrize("batch", [1, 64])
def test_fp16_plans_follow_the_rule(op, batch):
    # Every adapter dot of fp16 x (mixing, scores, shrink, the GEMM's expand, the backward's
    # per-sample reductions) runs in the rule's adapter precision: 3xTF32; below 16 samples the
    # retrieval's scores and mixing run in fp32 on FMA units instead (at least as accurate: contract).
    rule = precision.RULES["fp16"]
    assert rule.adapter == rule.mixing == rule.scores == "3xtf32"
    planned = _planned_precisions(torch.float16, op, batch)
    assert any(name.startswith("gemm") for name, _ in planned)
    # (retrieve_total: the backward's replay of the forward's retrieval, for its affine sums.)
    fma = {(name, key): value for name in ("retrieve", "retrieve_total")
           for key, value in (("SCORE_PRECISION", "fma"), ("MIX_PRECISION", "ieee"))} if batch < 16 else {}
    assert planned and all(v == fma.get(k, _DOT_PRECISION[rule.adapter]) for k, v in planned.items()), planned
    assert {k for k in fma if k[0] == "retrieve"} <= set(planned)


@needs_triton
@pytest.mark.parametrize("op", ["linear", "linear_backward", "adapter_"])
def test_bf16_and_fp32_tf32_gemms_keep_their_precision(op):
    # The 3xTF32 fix is fp16's alone. The bf16 forward GEMM's shrink operands are bf16 (precision
    # unused); its expand is one TF32 product of fp32 h and B_b that the kernel rounds to nearest TF32
    # first (EXPAND_TF32, the bf16 rule), as is the dx GEMM's (fp32 factors: the memory is fp32), whose
    # shrink keeps one TF32 product into a bf16 output; fp32 x with allow_tf32 keeps one TF32 product
    # in the GEMM, truncated by the tensor cores (the `fp32-tf32` rule).
    bf16 = _planned_precisions(torch.bfloat16, op, 8)
    gemm = [v for (name, key), v in bf16.items() if name.startswith("gemm") and key == "LORA_PRECISION"]
    assert gemm and set(gemm) == {"tf32" if op == "linear_backward" else "ieee"}
    expand = {v for (name, key), v in bf16.items() if name.startswith("gemm") and key == "EXPAND_PRECISION"}
    assert expand == {_DOT_PRECISION["tf32"]} and precision.RULES["bf16"].expand == "tf32-rn"
    from mira_kernels.triton import lowering

    gemms = [launch for launch in lowering.plan_case(lowering.Case(op, torch.bfloat16, 8, 4, 30))
             if launch.name.startswith("gemm") and launch.constexprs["LORA"]]
    assert gemms and all(launch.constexprs["EXPAND_TF32"] for launch in gemms)
    fp32 = _planned_precisions(torch.float32, op, 8, fp32_precision="tf32")
    for key in ("LORA_PRECISION", "EXPAND_PRECISION"):
        gemm = [v for (name, k), v in fp32.items() if name.startswith("gemm") and k == key]
        assert gemm and set(gemm) == {_DOT_PRECISION[precision.RULES["fp32-tf32"].adapter]}
    assert not any(launch.constexprs["EXPAND_TF32"] for launch in lowering.plan_case(
        lowering.Case(op, torch.float32, 8, 4, 30, fp32_precision="tf32")) if launch.name.startswith("gemm"))
