"""Triton backend decisions that must not depend on which GPU happens to be current or how many SMs it has.

Runs on a CPU: CUDA devices are faked (capabilities patched in; fake tensors for planning).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def two_gpus():
    """cuda:0 is an sm_90, cuda:1 an sm_75; cuda:0 is current."""
    import mira_kernels.triton as tri

    caps = {0: (9, 0), 1: (7, 5)}
    tri._capability.cache_clear()
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.current_device", lambda: 0), \
            mock.patch("torch.cuda.get_device_capability", lambda d=None: caps[0 if d is None else int(d)]):
        yield tri
    tri._capability.cache_clear()


def test_capability_is_read_from_the_tensors_device(two_gpus):
    from mira_kernels import backends

    tri = two_gpus
    assert tri.unavailable_reason(torch.device("cuda:0")) is None
    assert tri.unavailable_reason("cuda") is None  # the current device
    reason = tri.unavailable_reason(torch.device("cuda:1"))
    assert reason is not None and "cuda:1 has 7.5" in reason
    assert "triton" in backends.available_backends("cuda:0")
    assert "triton" not in backends.available_backends("cuda:1")
    with pytest.raises(RuntimeError, match="cuda:1 has 7.5"), mock.patch.dict("os.environ", {"MIRA_BACKEND": "triton"}):
        backends.resolve_backend(torch.device("cuda:1"))


def _backward_grids(sms: int):
    from mira_kernels.triton import launchers

    props = SimpleNamespace(multi_processor_count=sms, name="fake", major=9, minor=0)
    with FakeTensorMode(), mock.patch("torch.cuda.get_device_properties", lambda d=None: props):
        dev = dict(device="cuda")
        B, T, d = 64, 197, 768
        args = (torch.empty(B, T, 2304, **dev), torch.empty(B, T, d, **dev), torch.empty(2304, d, **dev),
                torch.empty(B, d, **dev), torch.empty(30, d, **dev), torch.empty(30, 2, 4, d, **dev),
                torch.empty(30, 2, d, 4, **dev), [0, 1536], "affine", 1.0, 1e-2, [True] * 5)
        _, plan = launchers.plan_linear_backward(*args)
        _, forward = launchers.plan_linear(args[1], args[2], None, *args[3:11])
    return [(la.name, la.grid, la.constexprs) for la in plan + forward]


def test_grids_do_not_depend_on_the_sm_count():
    # The split of the dw reduction fixes the order of its partial sums: an H100 SXM (132 SMs),
    # an H100 PCIe (114) and a MIG slice (16) must run the same order to give the same bits.
    sxm = _backward_grids(132)
    assert sxm == _backward_grids(114) == _backward_grids(16)
