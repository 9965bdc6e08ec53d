"""Ahead-of-time lowering of every MIRA Triton kernel for sm_80 and sm_90, without a GPU.

Compiles the launches of ``mira_kernels.triton.lowering.test_cases()`` (ViT-B/16 qkv shapes;
fp16, bf16, fp32 with TF32 and with IEEE dots; the GEMM's three tile buckets; r = 4 and 64;
N = 30 and 256) in a child process, and asserts, per compiled kernel and target: no register
spills (cuobjdump STACK and LOCAL are 0), shared memory within the target's per-block limit,
and the intended matrix instructions in the PTX (wgmma for the projection GEMM on sm_90,
mma.sync on sm_80, tensor-core instructions for the TF32 adapter kernels). The table of
registers and shared memory is printed (``pytest -s``). The full benchmark sweep:
``python -m mira_kernels.triton.lowering`` (benchmarks/results/triton_lowering.txt).
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
    "_mira_bank_bwd_kernel",
}


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowering") / "kernels.json"
    proc = run(["-m", "mira_kernels.triton.lowering", "--quick", "--json", str(path)], interpret=False, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    print(proc.stdout)
    return json.loads(path.read_text())


def test_every_kernel_compiles_for_both_targets(lowered):
    for arch in (80, 90):
        assert {r["kernel"] for r in lowered if r["arch"] == arch} == KERNELS, f"sm_{arch}"
    # 16-bit, fp32/TF32 and fp32/IEEE GEMMs, each for both targets.
    gemm = {(r["arch"], r["intended"]) for r in lowered if r["kernel"] == "_mira_gemm_kernel"}
    assert gemm >= {(80, "mma.sync"), (90, "wgmma"), (80, "fma"), (90, "fma")}


def test_no_spills(lowered):
    spilled = [(r["kernel"], r["arch"], r["case"], r["stack"], r["local"]) for r in lowered if r["spills"]]
    assert not spilled


def test_shared_memory_fits_target(lowered):
    over = [(r["kernel"], r["arch"], r["case"], r["shared"]) for r in lowered if r["shared"] > r["smem_limit"]]
    assert not over
    assert all(r["registers"] <= 255 for r in lowered)


def test_intended_matrix_instructions(lowered):
    missing = [(r["kernel"], r["arch"], r["case"], r["intended"], r["mma_kinds"]) for r in lowered
               if not r["meets_intent"]]
    assert not missing
    # The 16-bit projection GEMM: f16/bf16 operands on the tensor cores of both targets.
    kinds = {(r["arch"], k) for r in lowered if r["kernel"] == "_mira_gemm_kernel" for k in r["mma_kinds"]}
    assert any(a == 80 and k.startswith("mma.sync") and ".f16.f16" in k for a, k in kinds)
    assert any(a == 80 and k.startswith("mma.sync") and ".bf16.bf16" in k for a, k in kinds)
    assert any(a == 90 and k.startswith("wgmma") and k.endswith(".f16.f16") for a, k in kinds)
    assert any(a == 90 and k.startswith("wgmma") and k.endswith(".bf16.bf16") for a, k in kinds)
