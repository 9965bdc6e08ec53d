"""Routing to the CUDA C++ backend decided by the tensor's own GPU, on a CPU (devices faked).

cuda:0 is an sm_90 and current, cuda:1 an sm_75: the build (sm_80, sm_90 and PTX) has no code for
the second, so tensors there must not be routed to ``cuda``, whatever device is current.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from mira_kernels import _extension, backends


@pytest.fixture
def two_gpus():
    caps = {0: (9, 0), 1: (7, 5)}
    backends._capability.cache_clear()
    real_has_kernel = _extension.has_kernel
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.current_device", lambda: 0), \
            mock.patch("torch.cuda.get_device_capability", lambda d=None: caps[0 if d is None else int(d)]), \
            mock.patch.object(_extension, "cuda_archs", lambda: (800, 900)), \
            mock.patch.object(_extension, "has_kernel",
                              lambda op, key: key == "CUDA" or real_has_kernel(op, key)):
        yield
    backends._capability.cache_clear()


def test_cuda_backend_follows_the_tensors_device(two_gpus):
    assert "cuda" in backends.available_backends("cuda:0")
    assert "cuda" in backends.available_backends("cuda")  # the current device
    assert "cuda" not in backends.available_backends("cuda:1")
    with pytest.raises(RuntimeError, match="cuda:1 has 7.5"), mock.patch.dict("os.environ", {"MIRA_BACKEND": "cuda"}):
        backends.resolve_backend(torch.device("cuda:1"))
    with mock.patch.dict("os.environ", {"MIRA_BACKEND": "cuda"}):
        assert backends.resolve_backend(torch.device("cuda:0")) == "cuda"


def test_arch_list_of_the_build():
    if not _extension.has_kernel("_cuda_mira_linear", "CUDA"):
        pytest.skip("the extension was built without its CUDA part" + _extension.load_error_suffix())
    archs = _extension.cuda_archs()
    # setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX" unless the builder chose others.
    assert archs and all(a % 10 == 0 and a >= 300 for a in archs), archs
    assert list(archs) == sorted(archs)


def test_float32_defaults_to_cuda_and_16_bit_to_triton(monkeypatch):
    # The default order only (every backend made available): fp32 x on CUDA measured faster through
    # the CUDA C++ backend (cuBLAS fp32 GEMM + adapter pass) than through Triton's IEEE-fp32 GEMM.
    monkeypatch.setattr(backends, "_reason", lambda name, device: None)
    monkeypatch.delenv("MIRA_BACKEND", raising=False)
    cuda = torch.device("cuda:0")
    assert backends.resolve_backend(cuda, torch.float32) == "cuda"
    for dtype in (torch.bfloat16, torch.float16, torch.float64, None):
        assert backends.resolve_backend(cuda, dtype) == "triton"
    assert backends.resolve_backend(torch.device("cpu"), torch.float32) == "cpu"
    with mock.patch.dict("os.environ", {"MIRA_BACKEND": "triton"}):
        assert backends.resolve_backend(cuda, torch.float32) == "triton"  # a forced name still wins
    monkeypatch.setattr(backends, "_reason", lambda name, device: "absent" if name == "cuda" else None)
    assert backends.resolve_backend(cuda, torch.float32) == "triton"
