"""The CUDA backend's host glue (``csrc/cuda/mira_cuda.cu``) run on the CPU: its checks, before any device work.

The private ops ``mira::_cuda_*`` have kernels for the CUDA dispatch key only. Redispatching one to that key
with CPU tensors runs the compiled glue on this machine: it checks the arguments with the contract's shared
rules (``csrc/validation.h``), then this backend's launch limits (from the sizes alone), then refuses the CPU
tensor (``x must be a CUDA tensor``) before it touches a device or allocates anything. So reaching that refusal
proves a call passed every check, and a contract or limit error proves the glue raised it first (a failed call
changes nothing). What runs after the refusal
(kernels, cuBLAS) is covered by the emulation (``tests/test_cuda_emulation.py``) and the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch

from mira_kernels import _extension
from tests.mira_inputs import make_inputs

pytestmark = pytest.mark.skipif(not _extension.has_kernel("_cuda_mira_adapter_", "CUDA"),
                                reason="the extension was built without its CUDA part" + _extension.load_error_suffix())

CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
PASSED_CHECKS = "x must be a CUDA tensor"  # the glue's first refusal after the contract's checks
KW = ("affine", 1.0, 1e-2)


def _adapter(out, x, query, keys, bank_a, bank_b, offsets):
    torch.ops.mira._cuda_mira_adapter_.default.redispatch(CUDA_KEY, out, x, query, keys, bank_a, bank_b, offsets, *KW)


def _backward(grad_out, x, weight, query, keys, bank_a, bank_b, offsets, mask=(True,) * 5):
    return torch.ops.mira._cuda_mira_linear_backward.default.redispatch(
        CUDA_KEY, grad_out, x, weight, query, keys, bank_a, bank_b, offsets, *KW, list(mask))


def _linear(x, weight, bias, query, keys, bank_a, bank_b, offsets):
    return torch.ops.mira._cuda_mira_linear.default.redispatch(CUDA_KEY, x, weight, bias, query, keys, bank_a, bank_b,
                                                               offsets, *KW)


def _square():
    # d_out = d_in, two slices covering every column: the shape where out may be x itself.
    return make_inputs(B=2, T=3, d_in=8, d_out=8, N=3, S=2, r=2, d_s=4, offsets=[4, 0], dtype=torch.float32)


def _passes_checks(call, *args):
    with pytest.raises(RuntimeError, match=PASSED_CHECKS):
        call(*args)


def test_valid_call_passes_the_checks_and_changes_nothing():
    inp = _square()
    out = torch.zeros(2, 3, 8)
    _passes_checks(_adapter, out, *inp.adapter_args(), inp.slice_offsets)
    assert not out.any()  # refused before any write
    _passes_checks(_linear, *inp.linear_args(), inp.slice_offsets)


def test_contract_errors_come_first():
    inp = _square()
    bad_bank = inp.bank_a[:, :1]  # S = 1 against two slice offsets
    with pytest.raises(ValueError, match="bank_a"):
        _adapter(torch.zeros(2, 3, 8), inp.x, inp.query, inp.keys, bad_bank, inp.bank_b, inp.slice_offsets)
    with pytest.raises(ValueError):
        _linear(inp.x, inp.weight, inp.bias, inp.query, inp.keys, inp.bank_a, inp.bank_b, [4, 2])  # overlapping slices


def test_out_may_be_x_itself():
    # The alias the contract allows (same view, d_out = d_in); the emulation checks the kernels' result
    # (test_cuda_emulation.py::test_adapter_into_x_itself).
    inp = _square()
    x = inp.x.clone()
    _passes_checks(_adapter, x, x, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets)
    assert torch.equal(x, inp.x)


def test_disjoint_views_of_one_buffer_may_be_out_and_inputs():
    inp = _square()
    buf = torch.zeros(2 * inp.x.numel())
    x, out = buf[: inp.x.numel()].view(2, 3, 8), buf[inp.x.numel():].view(2, 3, 8)
    x.copy_(inp.x)
    _passes_checks(_adapter, out, x, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets)
    # A strided out whose elements interleave with nothing else's span.
    wide = torch.zeros(2, 3, 16)[..., ::2]
    _passes_checks(_adapter, wide, inp.x, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets)


def test_inputs_may_overlap_each_other_and_themselves():
    # Inputs are only read: expanded (stride 0) x, query, keys and banks are fine, for both ops.
    inp = _square()
    x = inp.x[:1, :1].expand(2, 3, 8)
    query = inp.query[:1].expand(2, -1)
    keys = inp.keys[:1].expand(3, -1)
    bank_a = inp.bank_a[:1].expand(3, -1, -1, -1)
    bank_b = inp.bank_b[:1].expand(3, -1, -1, -1)
    _passes_checks(_adapter, torch.zeros(2, 3, 8), x, query, keys, bank_a, bank_b, inp.slice_offsets)
    _passes_checks(_linear, x, inp.weight, inp.bias, query, keys, bank_a, bank_b, inp.slice_offsets)


# The overlapping-memory rule (docs/contract.md section 6, issue 15): mira_adapter_ writes every element of out
# while it reads its inputs. The glue must refuse these before any device work, and leave out unchanged. The rule
# lives in the shared checks (csrc/validation.cpp, mirrored by _validation.check_out_overlap).


def test_out_overlapping_itself_is_refused():
    inp = _square()
    expanded = torch.zeros(1, 3, 8).expand(2, 3, 8)  # stride 0: two samples write one element
    with pytest.raises(ValueError, match="overlap"):
        _adapter(expanded, *inp.adapter_args(), inp.slice_offsets)
    interleaved = torch.zeros(64).as_strided((2, 3, 8), (8, 8, 1))  # tokens share rows
    with pytest.raises(ValueError, match="overlap"):
        _adapter(interleaved, *inp.adapter_args(), inp.slice_offsets)


@pytest.mark.parametrize("victim", ["x", "query", "keys", "bank_a", "bank_b"])
def test_out_overlapping_an_input_is_refused(victim):
    inp = _square()
    args = dict(zip(("x", "query", "keys", "bank_a", "bank_b"), inp.adapter_args()))
    n_out = 2 * 3 * 8
    # The input's storage holds out too, shifted by one element: their spans meet, and out is not the input itself.
    buf = torch.zeros(n_out + args[victim].numel() + 1)
    shared = buf[1 : 1 + args[victim].numel()].view(args[victim].shape)
    shared.copy_(args[victim])
    args[victim] = shared
    out = buf[:n_out].view(2, 3, 8)
    before = buf.clone()
    with pytest.raises(ValueError, match=victim):
        _adapter(out, *args.values(), inp.slice_offsets)
    assert torch.equal(buf, before)  # refused before any write


def _oversized():
    # B * 8 token tiles = 2.4e9 > 2^31 - 1 blocks of the token kernels, on zero-stride views of a few bytes: x
    # "holds" 19.2e9 rows (307 GB in float32), so anything that copied, reshaped into a GEMM or allocated per row
    # before the limit check would fail (or crash) instead of raising the limit's error.
    B = 300_000_000
    x = torch.zeros(1, 1, 4).expand(B, 64, 4)
    query = torch.zeros(1, 4).expand(B, 4)
    memory = (query, torch.zeros(2, 4), torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 4, 1))
    return x, torch.zeros(4, 4), memory


def test_oversized_grid_is_refused_from_the_sizes_before_the_device():
    # The launch limits are size arithmetic, checked before anything touches the device or the data (the GPU
    # run's test_refuses_a_grid_beyond_the_cuda_limit_before_any_work crashed its worker on this call). Before,
    # this CPU call reached the device refusal first, so the limit check was not reachable without a GPU.
    x, weight, memory = _oversized()
    with pytest.raises(RuntimeError, match="2\\^31 - 1 blocks") as err:
        _linear(x, weight, None, *memory, [0])
    assert "B = 300000000" in str(err.value) and "mira_linear (cuda)" in str(err.value)
    grad_out = torch.zeros(1, 1, 4).expand_as(x)
    for mask in [(True,) * 5, (True, False, False, False, False), (False, True, True, True, True)]:
        with pytest.raises(RuntimeError, match="2\\^31 - 1 blocks"):
            _backward(grad_out, x, weight, *memory, [0], mask)


def test_grid_at_the_limit_passes_the_checks():
    # Just under the limit (B * 8 tiles = 2^31 - 8 blocks) the call passes every check and reaches the device
    # refusal: the limit is not off by a tile.
    x, weight, memory = _oversized()
    B = (2**31 - 1) // 8
    x, query = x[:1].expand(B, 64, 4), memory[0][:1].expand(B, 4)
    _passes_checks(_linear, x, weight, None, query, *memory[1:], [0])


def test_size_products_beyond_int64_are_refused():
    # Zero-stride banks of rank r = 2^30 and a zero-stride x of 2^34 tokens: every grid fits, but the workspace's
    # tile rows (B * T * S * r elements) overflow int64. Refused from the sizes, before the device check.
    B, T, r = 1, 8 * (2**31 - 1), 2**30
    x = torch.zeros(1, 1, 1).expand(B, T, 1)
    bank_a = torch.zeros(1, 1, 1, 1).expand(1, 1, r, 1)
    bank_b = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, r)
    with pytest.raises(RuntimeError, match="2\\^58 elements"):
        _linear(x, torch.zeros(1, 1), None, torch.zeros(B, 1), torch.zeros(1, 1), bank_a, bank_b, [0])
