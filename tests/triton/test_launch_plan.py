"""The backend-neutral launch plans (mira_kernels.launch_plan) of the Triton backend, on meta tensors.

The GPU model prices these records; here we check they are the backend's real launches (names and
grids equal to the planner's), complete (every FLOP class and byte count present and at least the
math's minimum), and that the record types reject malformed input.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mira_kernels import launch_plan

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

T, D, D_OUT, OFFS = 197, 768, 2304, [0, 1536]
META = dict(device="meta")


def _args(op, B, dtype=torch.bfloat16, N=30, r=4):
    mem = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = torch.empty(B, T, D, dtype=dtype, **META)
    weight = torch.empty(D_OUT, D, dtype=dtype, **META)
    bias = torch.empty(D_OUT, dtype=dtype, **META)
    memory = (torch.empty(B, D, dtype=mem, **META), torch.empty(N, D, dtype=mem, **META),
              torch.empty(N, 2, r, D, dtype=mem, **META), torch.empty(N, 2, D, r, dtype=mem, **META))
    rest = (OFFS, "affine", 1.0, 1e-2)
    if op == "mira_linear":
        return (x, weight, bias, *memory, *rest)
    if op == "mira_adapter_":
        return (torch.empty(B, T, D_OUT, dtype=dtype, **META), x, *memory, *rest)
    grad = torch.empty(B, T, D_OUT, dtype=dtype, **META)
    return (grad, x, weight, *memory, *rest, [True, True, True, False, False])


@pytest.mark.parametrize("op", launch_plan.OPS)
@pytest.mark.parametrize("B", [1, 64])
def test_triton_plan_is_the_planners_launches(op, B):
    from mira_kernels.triton import launchers

    args = _args(op, B)
    plan = launch_plan.describe("triton", op, *args, sms=132)
    planner = {"mira_linear": launchers.plan_linear, "mira_linear_backward": launchers.plan_linear_backward,
               "mira_adapter_": launchers.plan_adapter_}[op]
    _, launches = planner(*args)
    assert [(k.name, k.grid) for k in plan.launches] == [(la.name, tuple(la.grid)) for la in launches]
    assert plan.host_syncs == 0 and plan.allocations >= (0 if op == "mira_adapter_" else 1)
    for k in plan.launches:
        assert k.programs > 0 and k.threads in (128, 256)
        assert k.total_flops >= k.useful_flops > 0, k.name
        assert k.bytes_read > 0 and k.bytes_written > 0 and k.steps >= 1, k.name


def test_plan_counts_at_least_the_math():
    # The forward's executed FLOPs cover the base GEMM and the adapter's useful work, and its
    # device traffic covers reading x and W and writing y once.
    B = 8
    plan = launch_plan.describe("triton", "mira_linear", *_args("mira_linear", B), sms=132)
    M = B * T
    useful = 2.0 * M * D * D_OUT + 2.0 * M * 2 * 4 * (D + D)
    assert sum(k.total_flops for k in plan.launches) >= useful
    assert sum(k.bytes for k in plan.launches) >= 2 * (M * D + D * D_OUT + M * D_OUT)


def test_records_reject_malformed_input():
    with pytest.raises(ValueError, match="FLOP classes"):
        launch_plan.KernelLaunch("k", "f", (1,), 32, {"bf16": 1.0}, 0, 0)
    k = launch_plan.KernelLaunch("k", "f", (2, 3), 128, {"tc_bf16": 1.0}, 10, 5)
    assert k.programs == 6 and k.bytes == 15
    with pytest.raises(ValueError, match="unique"):
        launch_plan.OpPlan("triton", "mira_linear", (k, k))
    with pytest.raises(ValueError, match="unknown op"):
        launch_plan.describe("triton", "linear")
    with pytest.raises(ValueError, match="no launch planner"):
        launch_plan.planner("cpu")


@pytest.mark.parametrize("op", ["linear", "linear_backward", "adapter_"])
def test_interpreter_upcast_never_reaches_a_compiled_plan(op, monkeypatch):
    # The fused GEMM runs bf16 dots in fp32 only under the interpreter (whose bf16 tl.dot is wrong):
    # plans for a GPU or for compiling ahead of time (meta tensors) keep bf16 operands even when the
    # process has TRITON_INTERPRET set.
    from mira_kernels.triton import launchers, lowering

    monkeypatch.setattr(launchers, "interpreting", lambda: True)
    gemms = [launch for launch in lowering.plan_case(lowering.Case(op, torch.bfloat16, 8, 4, 30))
             if "UPCAST" in launch.constexprs]
    assert gemms and not any(launch.constexprs["UPCAST"] for launch in gemms)
    assert launchers.interpreter_upcast(torch.empty(1, dtype=torch.bfloat16), torch.bfloat16)
    assert not launchers.interpreter_upcast(torch.empty(1, dtype=torch.float16), torch.float16)


def test_factor_storage_follows_the_precision_rules():
    # Contract section 11: bf16 factors only for bf16 x (in the backward only with bf16 memory); fp16 x
    # keeps fp32 factors (fp16 would overflow at 65504 where the fp32 reference does not).
    from mira_kernels.triton import launchers

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert launchers.factor_dtype(bf16) == bf16
    assert launchers.factor_dtype(fp16) == fp32
    assert launchers.factor_dtype(bf16, (bf16,) * 4) == bf16
    assert launchers.factor_dtype(bf16, (bf16, bf16, fp32, bf16)) == fp32
    assert launchers.factor_dtype(fp16, (fp16,) * 4) == fp32
    assert launchers.factor_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("B", [1, 2, 8])
def test_unfolded_plans_chain_their_launches_at_small_batch_on_hopper(B):
    # fp16 x (fp32 factors: its shrink never folds) at ViT-B/16 on Hopper up to configs.SHRINK_BESIDE_ROWS
    # rows (B <= 2): the shrink (16-row programs) starts with the retrieval and waits for its factors;
    # the GEMM (64 x 64 tiles of 4 warps, small enough to share an SM with the waiting programs)
    # starts with both and waits only before its expand. From B = 8 (8-warp GEMM programs that need a
    # whole SM) the three launches run in turn. bf16 keeps its shrink folded at every batch.
    from mira_kernels.triton import configs, launchers, plan

    with launchers.planning_for((9, 0)):
        _, launches = launchers.plan_linear(*_args("mira_linear", B, torch.float16))
        _, bf16 = launchers.plan_linear(*_args("mira_linear", B))
    assert [la.name for la in bf16] == ["retrieve", "gemm"] and bf16[-1].constexprs["LORA"] == 1 and bf16[-1].pdl
    assert [la.name for la in launches] == ["retrieve", "shrink", "gemm"]
    shrink, gemm = launches[1].constexprs, launches[-1].constexprs
    assert gemm["LORA"] == 2 and not shrink["NATIVE"]  # fp32 factors
    if B * T > configs.SHRINK_BESIDE_ROWS:
        assert not any(la.pdl or la.constexprs.get("USE_PDL") for la in launches)
        return
    assert all(la.pdl for la in launches[1:]) and shrink["USE_PDL"] and gemm["USE_PDL"]
    assert shrink["BLOCK_M"] == 16 and launches[-1].num_warps == 4
    record = plan.kernel_launch(launches[-1])
    assert 0.5 < record.wait_fraction < 1.0  # after the main loop, before the expand
    # Without programmatic dependent launch (sm_80, or CPU tensors under the interpreter) nothing is chained.
    with launchers.planning_for((8, 0)):
        _, launches = launchers.plan_linear(*_args("mira_linear", B, torch.float16))
    assert not any(la.pdl for la in launches)
