"""The CUDA backend's Python launch plan (``mira_kernels.cuda_plan``) against its C++ host plan.

The C++ plan (``csrc/cuda/mira_kernels.cuh``) runs in the CPU emulation's plan-only mode (nothing executed,
any problem size), and every kernel launch must agree with the Python restatement the GPU model reads:
kernel, grid and dynamic shared memory, in order, at ViT sizes and at the edges (B = 0, T = 0, N = 0,
N above one score pass, S above the by-value offsets, tile rows spilled to global memory, partial
gradient masks).
"""

from __future__ import annotations

import pytest
import torch

from mira_kernels import cuda_plan, launch_plan
from tests.cuda_emu import PlanError, build_driver, plan_launches

VIT_B = dict(B=256, T=197, d_in=768, d_out=2304, N=30, d_k=768, S=2, r=4, d_s=768, offsets=[0, 1536])
CASES = {
    "vit_b_b256_bf16": dict(VIT_B, dtype=torch.bfloat16),
    "vit_b_b1_fp32": dict(VIT_B, B=1, dtype=torch.float32),
    "vit_l384_b1212_bf16": dict(B=1212, T=577, d_in=1024, d_out=3072, N=30, d_k=1024, S=2, r=4, d_s=1024,
                                offsets=[0, 2048], dtype=torch.bfloat16),
    "s20_fp64": dict(B=3, T=9, d_in=5, d_out=60, N=4, d_k=5, S=20, r=1, d_s=3, dtype=torch.float64),
    "s600_fp16": dict(B=2, T=3, d_in=4, d_out=600, N=2, d_k=4, S=600, r=1, d_s=1, dtype=torch.float16),
    # S*r = 600 doubles per token row: 8 rows exceed the 32 KiB budget, the tile rows go to global memory.
    "spill_fp64": dict(B=2, T=4, d_in=16, d_out=2048, N=3, d_k=16, S=2, r=300, d_s=1024, offsets=[0, 1024],
                       dtype=torch.float64),
    "n300_softmax": dict(B=2, T=3, d_in=8, d_out=8, N=300, d_k=8, S=1, r=1, d_s=8, dtype=torch.float32,
                         separation="softmax"),
    "n0": dict(B=2, T=5, d_in=12, d_out=36, N=0, d_k=12, S=2, r=3, d_s=12, dtype=torch.float32),
    "t0": dict(B=2, T=0, d_in=12, d_out=36, N=3, d_k=12, S=2, r=3, d_s=12, dtype=torch.bfloat16),
    "b0": dict(B=0, T=5, d_in=12, d_out=36, N=3, d_k=12, S=2, r=3, d_s=12, dtype=torch.float32),
}
MASKS = [(True,) * 5, (True, False, False, False, False), (False, True, False, False, False),
         (False, False, True, False, False), (False, False, False, True, False), (True, False, False, False, True)]


@pytest.fixture(scope="module")
def driver():
    return build_driver()


def _meta_args(op, case, mask=None):
    c = dict(case)
    dtype = c.pop("dtype")
    separation = c.pop("separation", "affine")
    B, T, d_in, d_out, N, d_k, S, r, d_s = (c[k] for k in ("B", "T", "d_in", "d_out", "N", "d_k", "S", "r", "d_s"))
    offsets = c.get("offsets") or [s * d_s for s in range(S)]
    mem = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def t(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)

    x, w, bias = t(B, T, d_in), t(d_out, d_in), t(d_out)
    memory = (t(B, d_k, dt=mem), t(N, d_k, dt=mem), t(N, S, r, d_in, dt=mem), t(N, S, d_s, r, dt=mem))
    tail = (offsets, separation, 1.0, 1e-2)
    if op == "mira_linear":
        return (x, w, bias, *memory, *tail)
    if op == "mira_adapter_":
        return (t(B, T, d_out), x, *memory, *tail)
    return (t(B, T, d_out), x, w, *memory, *tail, list(mask))


def _emulated(driver, op, case, mask):
    c = dict(case)
    return plan_launches(driver, backward=op == "mira_linear_backward", dtype=c.pop("dtype"),
                         separation=c.pop("separation", "affine"), slice_offsets=c.pop("offsets", None),
                         output_mask=mask, **{k: v for k, v in c.items() if k != "d_out"}).plan


def _ops():
    yield "mira_linear", (False,) * 5
    yield "mira_adapter_", (False,) * 5
    for mask in MASKS:
        yield "mira_linear_backward", mask


@pytest.mark.parametrize("name", list(CASES))
def test_python_plan_matches_the_cpp_plan(driver, name):
    case = CASES[name]
    for op, mask in _ops():
        want = _emulated(driver, op, case, mask)
        plan = launch_plan.describe("cuda", op, *_meta_args(op, case, mask))
        kernels = [k for k in plan.launches if k.library is None]
        got = [(k.kernel, k.grid[0]) for k in kernels]
        assert got == [(w.kernel, w.blocks) for w in want], f"{name} {op} {mask}"
        # Dynamic shared memory: the Python restatement of the list, and the records' totals above the static part.
        c = dict(case)
        dims = cuda_plan.Dims(*(c[k] for k in ("B", "T", "d_in", "N", "d_k", "S", "r", "d_s")))
        acc = 8 if c["dtype"] == torch.float64 else 4
        specs = cuda_plan.kernel_launches(op, dims, acc, mask)
        assert [s.smem for s in specs] == [w.smem for w in want], f"{name} {op} {mask}"
        for k, w in zip(kernels, want):
            assert k.smem_bytes >= w.smem and k.threads == cuda_plan.THREADS
            assert k.bytes_read >= 0 and k.bytes_written >= 0 and k.steps >= 1


def test_vit_b_forward_launches_and_costs():
    plan = launch_plan.describe("cuda", "mira_linear", *_meta_args("mira_linear", CASES["vit_b_b256_bf16"]))
    assert [k.name for k in plan.launches] == ["base_gemm", "retrieve", "apply"]
    gemm, retrieve, apply = plan.launches
    M = 256 * 197
    assert gemm.library == "cublas" and gemm.gemm == (M, 2304, 768) and gemm.flops == {"tc_bf16": 2.0 * M * 2304 * 768}
    # 32 tiles of 8 samples x 12 chunks of 1024 of the 2*4*768*2 factor columns: the banks (1.47 MB in fp32)
    # are read 32 times from L2 instead of 256.
    assert retrieve.grid == (32 * 12,)
    bank, keys, queries = 30 * (2 * 4 * 768 * 2) * 4, 30 * 768 * 4, 256 * 768 * 4
    assert retrieve.bytes_read >= bank
    assert retrieve.l2_bytes == 31 * bank + 383 * keys + 11 * queries
    assert apply.grid == (256 * 25,)  # 25 tiles of 8 tokens per sample
    # The adapter's read-modify-write: both 768-wide bf16 slices read and written, x re-read.
    assert apply.bytes_written == M * 2 * 768 * 2
    assert apply.bytes_read == M * 768 * 2 + M * 2 * 768 * 2
    assert plan.host_syncs == 0 and plan.allocations == 2  # y and the workspace


def test_memory_side_conversions_are_listed():
    # bf16 memory tensors with bf16 x: the glue converts them to float32 (four copies), and the backward
    # converts the memory gradients back.
    args = list(_meta_args("mira_linear_backward", CASES["vit_b_b1_fp32"], (True,) * 5))
    args[1] = args[1].to(torch.bfloat16)
    args[0] = args[0].to(torch.bfloat16)
    args[2] = args[2].to(torch.bfloat16)
    for i in (3, 4, 5, 6):
        args[i] = args[i].to(torch.bfloat16)
    plan = cuda_plan.describe("mira_linear_backward", *args)
    names = [k.name for k in plan.launches]
    assert names[:5] == ["grad_gemm", "query_to_compute", "keys_to_compute", "bank_a_to_compute", "bank_b_to_compute"]
    assert names[-4:] == ["dquery_to_input", "dkeys_to_input", "dbank_a_to_input", "dbank_b_to_input"]


def test_oversized_grid_refused_by_both(driver):
    case = dict(CASES["vit_l384_b1212_bf16"], B=160_000_000)
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        cuda_plan.describe("mira_linear", *_meta_args("mira_linear", case))
    with pytest.raises(PlanError):
        _emulated(driver, "mira_linear", case, (False,) * 5)


def test_size_products_beyond_int64_refused_by_both(driver):
    # Every grid fits (T / 8 = 2^31 - 1 token tiles, 2^21 column chunks), but the tile-row scratch B * T * S * r
    # (2^34 * 2^30) does not fit in int64: the plan used to multiply it anyway (signed overflow, caught here by
    # UBSan) and would have sized the workspace from the wrapped value.
    case = dict(B=1, T=8 * (2**31 - 1), d_in=1, d_out=1, N=1, d_k=1, S=1, r=2**30, d_s=1, dtype=torch.float32)
    for op, mask in [("mira_linear", (False,) * 5), ("mira_linear_backward", (True,) * 5)]:
        with pytest.raises(ValueError, match="2\\^58 elements"):
            cuda_plan.describe(op, *_meta_args(op, case, mask))
        with pytest.raises(PlanError, match="2\\^58 elements"):
            _emulated(driver, op, case, mask)
