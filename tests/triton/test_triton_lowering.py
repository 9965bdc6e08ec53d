"""Ahead-of-time lowering of the MIRA Triton kernels for sm_80 and sm_90, without a GPU.

Compiles launch plans of ViT-B/16 qkv shapes in a child process and asserts, per compiled kernel
and target: no register spills (cuobjdump STACK and LOCAL are 0), shared memory within the
target's per-block limit, and the intended matrix instructions in the PTX (wgmma for the projection
GEMM on sm_90, mma.sync on sm_80, tensor-core instructions for the TF32 adapter kernels).

Each compile takes seconds, so CI (``make test``) compiles ``lowering.ci_cases()``: every kernel
once for sm_90 and the bf16 forward (the GEMM with the shrink folded in) for both targets.
``make test-slow`` runs the same checks on ``lowering.test_cases()`` (fp16, bf16,
fp32 with TF32 and IEEE dots, the GEMM's tile buckets, r = 4 to 128, N = 30 and 256), and
``python -m mira_kernels.triton.lowering`` compiles the whole benchmark sweep
(benchmarks/results/triton_lowering.txt). The table of registers and shared memory is printed
(``pytest -s``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.triton._subprocess import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KERNELS = {
    "_mira_retrieve_kernel", "_mira_gemm_kernel", "_mira_shrink_fwd_kernel",
    "_mira_factor_bwd_kernel", "_mira_dw_bwd_kernel", "_mira_scores_bwd_kernel", "_mira_keys_bwd_kernel",
    "_mira_bank_bwd_kernel", "_normalize_columns_kernel",
}


def _lower(tmp_path_factory, subset: str, timeout: float) -> list[dict]:
    path = tmp_path_factory.mktemp("lowering") / "kernels.json"
    proc = run(["-m", "mira_kernels.triton.lowering", subset, "--json", str(path)], interpret=False, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    print(proc.stdout)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ci(tmp_path_factory):
    return _lower(tmp_path_factory, "--ci", 600)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _lower(tmp_path_factory, "--quick", 3600)


def _check_resources(lowered):
    spilled = [(r["kernel"], r["arch"], r["case"], r["stack"], r["local"]) for r in lowered if r["spills"]]
    assert not spilled
    over = [(r["kernel"], r["arch"], r["case"], r["shared"]) for r in lowered if r["shared"] > r["smem_limit"]]
    assert not over
    assert all(r["registers"] <= 255 for r in lowered)
    missing = [(r["kernel"], r["arch"], r["case"], r["intended"], r["mma_kinds"]) for r in lowered
               if not r["meets_intent"]]
    assert not missing


def _gemm_kinds(lowered):
    return {(r["arch"], k) for r in lowered if r["kernel"] == "_mira_gemm_kernel" for k in r["mma_kinds"]}


def test_ci_subset_compiles_every_kernel_without_spills(ci):
    assert {r["kernel"] for r in ci if r["arch"] == 90} == KERNELS
    _check_resources(ci)
    kinds = _gemm_kinds(ci)
    assert any(a == 80 and k.startswith("mma.sync") and ".bf16.bf16" in k for a, k in kinds)
    assert any(a == 90 and k.startswith("wgmma") and k.endswith(".bf16.bf16") for a, k in kinds)
    # The TMA main loop (configs.overriding(tma=True)) lowers to TMA copies, and only where asked for.
    gemm90 = [r for r in ci if r["kernel"] == "_mira_gemm_kernel" and r["arch"] == 90]
    assert [r["tma"] for r in gemm90 if " tma" in r["case"]] == [True, True]
    assert not any(r["tma"] for r in ci if " tma" not in r["case"])
    assert [r["case"] for r in gemm90 if "PERSISTENT=True" in r["constexprs"]] == [
        "linear bf16 B=64 r=4 N=30 tma persistent"]


@pytest.mark.slow
def test_every_kernel_compiles_for_both_targets(full):
    for arch in (80, 90):
        assert {r["kernel"] for r in full if r["arch"] == arch} == KERNELS, f"sm_{arch}"
    # 16-bit, fp32/TF32 and fp32/IEEE GEMMs, each for both targets.
    gemm = {(r["arch"], r["intended"]) for r in full if r["kernel"] == "_mira_gemm_kernel"}
    assert gemm >= {(80, "mma.sync"), (90, "wgmma"), (80, "fma"), (90, "fma")}


@pytest.mark.slow
def test_no_spills_and_intended_instructions_across_the_test_matrix(full):
    _check_resources(full)
    # The 16-bit projection GEMM: f16/bf16 operands on the tensor cores of both targets.
    kinds = _gemm_kinds(full)
    assert any(a == 80 and k.startswith("mma.sync") and ".f16.f16" in k for a, k in kinds)
    assert any(a == 80 and k.startswith("mma.sync") and ".bf16.bf16" in k for a, k in kinds)
    assert any(a == 90 and k.startswith("wgmma") and k.endswith(".f16.f16") for a, k in kinds)
    assert any(a == 90 and k.startswith("wgmma") and k.endswith(".bf16.bf16") for a, k in kinds)


def test_the_wide_tile_only_where_a_program_computes_one_column_tile():
    # Planned on meta tensors for sm_90 (no compile): the 128 x 256 tile spilled 64-464 bytes with
    # Triton 3.8 in programs of several column tiles (B = 256), in the in-place adapter and in the dx
    # GEMM with h from its own launch; there the planner takes 128 x 128 (configs.one_tile_fits).
    import torch

    from mira_kernels.triton import configs, launchers, lowering

    def gemm(case):
        with launchers.planning_for(capability=(9, 0)):
            plan = lowering.plan_case(case)
        c = next(la for la in plan if la.name.startswith("gemm")).constexprs
        return (c["BLOCK_M"], c["BLOCK_N"], c["TILES"], c["IN_PLACE"], c["LORA"])

    bf16 = torch.bfloat16
    assert gemm(lowering.Case("linear", bf16, 64, 4, 30)) == (128, 256, 1, False, 1)
    assert gemm(lowering.Case("linear", bf16, 256, 4, 30))[:2] == (128, 128)
    assert gemm(lowering.Case("adapter_", bf16, 8, 4, 30))[:2] == (128, 128)
    assert gemm(lowering.Case("linear_backward", bf16, 64, 4, 30))[:2] == (128, 128)
    # A sweep's forced tile is its own business: kept as forced.
    with configs.overriding(gemm=dict(block_n=256, block_k=32, num_warps=8, num_stages=4)):
        assert gemm(lowering.Case("linear", bf16, 256, 4, 30))[:2] == (128, 256)


def test_persistent_launch_takes_the_programs_asked_for():
    # configs.overriding(persistent=...): True gives PERSISTENT_PROGRAMS (an H100 SXM's / H200's 132
    # SMs), a positive int that many (make gpu-check passes the device's SM count: 114 on an H100
    # PCIe); planned on meta tensors for sm_90, bf16 B = 64 (396 work items on the narrow tile).
    import torch

    from mira_kernels.triton import configs, launchers, lowering

    def launch(persistent):
        with launchers.planning_for(capability=(9, 0)), configs.overriding(persistent=persistent):
            plan = lowering.plan_case(lowering.Case("linear", torch.bfloat16, 64, 4, 30))
        g = next(la for la in plan if la.name.startswith("gemm"))
        return g.grid, g.args["ITEMS"], g.constexprs["BLOCK_N"]

    grid, items, block_n = launch(None)
    assert grid == (items,) and block_n == 256  # one program per item, the wide tile
    grid, items, block_n = launch(True)
    assert grid == (configs.PERSISTENT_PROGRAMS,) < (items,) and block_n == 128
    assert launch(114)[0] == (114,)
    grid, items, _ = launch(10_000)  # never more programs than items
    assert grid == (items,)
    for bad in (0, -3, 1.5, "132"):
        with pytest.raises(ValueError, match="persistent"):
            with configs.overriding(persistent=bad):
                pass
