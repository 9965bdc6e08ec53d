"""benchmarks.gemm_probe: the plain Triton TMA GEMM that `make gpu-check` times beside cuBLAS.

Without a GPU: its numerics under the interpreter (float32, partial tiles, fewer programs than
tiles, a row-strided x) and its sm_90 lowering (wgmma, no spills, shared memory within the limit),
each in a child process. On an sm_90 device (`gpu` marker): bf16 at the ViT-B/16 qkv shape within
twice PyTorch's own error, and a CUDA-graph replay that gives the eager call's bits.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import gemm_probe
from tests.triton._subprocess import run

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _probe(tmp_path, *args: str, interpret: bool) -> dict:
    path = tmp_path / "probe.json"
    proc = run(["-m", "benchmarks.gemm_probe", *args, "--json", str(path)], interpret=interpret, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(path.read_text())


@needs_triton
def test_probe_matches_f_linear_under_the_interpreter(tmp_path):
    rows = _probe(tmp_path, "--check", interpret=True)["check"]
    assert len(rows) == 3 and {r["programs"] for r in rows} == {None, 2, 3} and any(r["strided_x"] for r in rows)
    for r in rows:
        assert r["rel_err"] <= 2 * r["pytorch_rel_err"] + 1e-7, r


@needs_triton
def test_probe_lowers_for_sm90_with_wgmma_and_no_spills(tmp_path):
    rows = _probe(tmp_path, "--lower", "90", interpret=False)["lower"]
    assert [r["config"] for r in rows] == [c.name for c in gemm_probe.CONFIGS]
    for r in rows:
        assert r["wgmma"] and r["stack"] == 0 and r["local"] == 0 and r["registers"] <= 255, r
        # At least the operand ring of num_stages tiles: the pipelining depth asked for took effect.
        assert r["ring"] <= r["shared"] <= r["smem_limit"], r


def test_probe_says_why_it_cannot_run_and_rejects_layouts_it_does_not_read():
    assert "CUDA" in gemm_probe.unavailable_reason("cpu")
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_probe.linear(x, w.t().contiguous().t(), None)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_probe.linear(x.t(), torch.randn(6, 4), None)
    with pytest.raises(ValueError, match="one dtype"):
        gemm_probe.linear(x, w.double(), None)


# The probe's own reason where a GPU is present (an older GPU, or a Triton without host tensor descriptors).
PROBE_UNAVAILABLE = gemm_probe.unavailable_reason("cuda") if torch.cuda.is_available() else "needs a CUDA device"


@pytest.mark.gpu
@pytest.mark.skipif(PROBE_UNAVAILABLE is not None, reason=str(PROBE_UNAVAILABLE))
@pytest.mark.parametrize("config", gemm_probe.CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("batch", [1, 8])
def test_probe_on_the_gpu_is_as_accurate_as_cublas_and_graph_safe(config, batch):
    g = torch.Generator().manual_seed(batch)
    x64 = torch.randn(batch, 197, 768, generator=g, dtype=torch.float64)
    w64 = torch.randn(2304, 768, generator=g, dtype=torch.float64) / 768**0.5
    b64 = 0.1 * torch.randn(2304, generator=g, dtype=torch.float64)
    x, w, b = (t.to("cuda", torch.bfloat16) for t in (x64, w64, b64))
    want = F.linear(x.double(), w.double(), b.double())

    def rel(got):
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    got = gemm_probe.linear(x, w, b, config)
    assert got.shape == (batch, 197, 2304) and got.dtype == torch.bfloat16
    assert rel(got) <= 2 * rel(F.linear(x, w, b)) + 1e-6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemm_probe.linear(x, w, b, config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, got)
