"""64-bit addressing: no kernel multiplies a row index by a run-time stride in 32 bits.

Triton types Python ints below 2^31 (strides, widths) as i32, so ``rows * stride`` wraps once
M * d_out passes 2^31 (ViT-L/16 at 384 px from B = 1212): an out-of-bounds write. Each op is
planned on meta tensors at a shape where every per-token tensor has more than 2^31 elements
(``lowering.HUGE``), each launch is lowered to Triton IR for sm_90, and the address arithmetic
of those tensors' pointers is searched for 32-bit products (``lowering.narrow_address_products``).
The same at shapes where the per-sample factors (mixed A_b, B_b and their gradients) pass 2^31
elements (``lowering.HUGE_FACTORS``); ``interp_checks.py::test_factor_samples_more_than_2_31_elements_apart``
runs the shrink and the factor backward under the interpreter on factors whose samples lie 2^30 apart.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("op", ["linear", "linear_backward", "adapter_"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_no_32_bit_address_products_at_huge_shapes(op, dtype):
    import torch

    from mira_kernels.triton import lowering

    assert not lowering.narrow_addressing(op, dtype=getattr(torch, dtype))


#: The launches whose per-sample factor pointers the check must reach at ``lowering.HUGE_FACTORS``
#: (every launch that reads or writes a mixed factor or its gradient), by op and shape.
FACTOR_POINTERS = {
    "linear": {"retrieve: mixed_a_ptr", "retrieve: mixed_b_ptr", "gemm: f_ptr", "gemm: e_ptr"},
    "adapter_": {"retrieve: mixed_a_ptr", "retrieve: mixed_b_ptr", "gemm: f_ptr", "gemm: e_ptr"},
    "linear_backward": {"retrieve: mixed_a_ptr", "retrieve: mixed_b_ptr", "shrink_h: f_ptr", "shrink_dh: f_ptr",
                        "gemm_dx: f_ptr", "gemm_dx: e_ptr", "factor_bwd_a: out_ptr", "factor_bwd_b: out_ptr",
                        "dw_bwd: dmixed_a_ptr", "dw_bwd: dmixed_b_ptr", "bank_bwd_a: d_ptr", "bank_bwd_b: d_ptr"},
}


@pytest.mark.parametrize("shape", ["wide", "folded"])
@pytest.mark.parametrize("op", ["linear", "linear_backward", "adapter_"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_no_32_bit_address_products_where_the_per_sample_factors_pass_2_31(op, dtype, shape):
    # The mixed factors (B, S, r, d_in), (B, S, d_s, r) and their gradients pass 2^31 elements at large
    # B x r (lowering.HUGE_FACTORS: 2^32): the shrink read F[b] at b * stride_fb, the factor backward
    # stored dA_b / dB_b at pid_b * stride_ob and the bank gradient read dmixed at b * F, all in 32 bits
    # (wrapped addresses: out-of-bounds reads and a store). Every launch's factor pointers are checked.
    import torch

    from mira_kernels.triton import lowering

    huge = lowering.HUGE_FACTORS[shape]
    checked = []
    assert not lowering.narrow_addressing(op, dtype=getattr(torch, dtype), huge=huge, checked=checked)
    want = set(FACTOR_POINTERS[op])
    plan = lowering.plan_case(lowering.Case(op, getattr(torch, dtype), huge["batch"], huge["rank"], 30),
                              shape={k: huge[k] for k in lowering.VIT_B})
    lora = {launch.constexprs["LORA"] for launch in plan if launch.name.startswith("gemm")}
    if shape == "folded" and dtype == "bfloat16" and op != "linear_backward":
        assert lora == {1}  # the shrink folded into the GEMM's main loop: f_ptr read there
    else:
        assert lora == {2}  # the shrink's own launch
        want.add("shrink_h: f_ptr" if op == "linear_backward" else "shrink: f_ptr")
    assert want <= set(checked), sorted(want - set(checked))


def test_the_check_finds_a_32_bit_row_product():
    # The checker itself: a kernel that multiplies a row index by an i32 stride is reported, and
    # the same kernel with the index widened first is not.
    from mira_kernels.triton import lowering

    ir = """
    tt.func public @k(%out_ptr: !tt.ptr<bf16>, %stride: i32) {
      %c64_i32 = arith.constant 64 : i32
      %pid = tt.get_program_id x : i32
      %row0 = arith.muli %pid, %c64_i32 : i32
      %r = tt.splat %row0 : i32 -> tensor<64xi32>
      %s = tt.splat %stride : i32 -> tensor<64xi32>
      %off = arith.muli %r, %s : tensor<64xi32>
      %p = tt.splat %out_ptr : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>>
      %q = tt.addptr %p, %off : tensor<64x!tt.ptr<bf16>>, tensor<64xi32>
      %r64 = arith.extsi %r : tensor<64xi32> to tensor<64xi64>
      %s64 = arith.extsi %s : tensor<64xi32> to tensor<64xi64>
      %off64 = arith.muli %r64, %s64 : tensor<64xi64>
      %q64 = tt.addptr %p, %off64 : tensor<64x!tt.ptr<bf16>>, tensor<64xi64>
    }"""
    found = lowering.narrow_address_products(ir, {"out_ptr"})
    assert len(found) == 1 and "%off = arith.muli %r, %s" in found[0]
    assert not lowering.narrow_address_products(ir, {"other_ptr"})
