"""64-bit addressing: no kernel multiplies a row index by a run-time stride in 32 bits.

Triton types Python ints below 2^31 (strides, widths) as i32, so ``rows * stride`` wraps once
M * d_out passes 2^31 (ViT-L/16 at 384 px from B = 1212): an out-of-bounds write. Each op is
planned on meta tensors at a shape where every per-token tensor has more than 2^31 elements
(``lowering.HUGE``), each launch is lowered to Triton IR for sm_90, and the address arithmetic
of those tensors' pointers is searched for 32-bit products (``lowering.narrow_address_products``).
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
