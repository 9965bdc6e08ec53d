"""Backend ``triton``: the MIRA ops as Triton kernels for NVIDIA GPUs.

Loaded by :mod:`mira_kernels.backends` only when the backend is used, so ``import mira_kernels``
never imports Triton. The three callables below follow the backend interface documented there
(the op schemas of ``csrc/mira_ops.cpp`` minus ``backend``); the kernels are in
:mod:`.kernels`, their launch plans in :mod:`.launchers`, the configuration table in
:mod:`.configs`. They also run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how they are tested on machines without a GPU.

Any slot count runs in the kernels (slots are taken in chunks); there is no reference fallback.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["unavailable_reason", "mira_linear", "mira_linear_backward", "mira_adapter_", "normalize_columns"]

#: Oldest GPU generation the kernels are written and lowered for (bf16 tl.dot needs sm_80).
MIN_CAPABILITY = (8, 0)

# The fused GEMM walks x and W with block pointers (far fewer registers than pointer tensors);
# Triton 3.8 marks them deprecated in favour of TMA descriptors, which need host-side set-up.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the kernels can run on ``device`` (default: the current CUDA device), else why not.

    The capability is the device's own: on a machine with an sm_90 and an sm_75 GPU, tensors on
    the second get another backend even while the first is current.
    """
    error = _import_error()
    if error is not None:
        return error
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _capability_reason(device)


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the router checks find_spec first
        return f"triton failed to import: {exc}"
    return None


def _capability_reason(device: torch.device | str | None) -> str | None:
    """:func:`unavailable_reason` once CUDA is known to be available: the router, which has checked
    that, calls this on every eager call (``torch.cuda.is_available`` reads an environment variable
    each time: ~2 us warm, more with cold caches)."""
    error = _import_error()
    if error is not None:
        return error
    index = _device_index(device)
    capability = _capability(index)
    if capability < MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= 8.0, cuda:{index} has "
                f"{capability[0]}.{capability[1]}")
    return None


def _device_index(device: torch.device | str | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    # Read once per device: routing asks on every eager call.
    return tuple(torch.cuda.get_device_capability(index))


@functools.cache
def _launchers():
    # The launchers (and through them Triton and the kernels) load on the first op call, so that
    # `import mira_kernels.triton` for unavailable_reason() or the config table stays cheap. Cached
    # after that: an import statement per call costs ~1 us of import machinery.
    from . import launchers

    return launchers


@functools.cache
def _plan_cache():
    from . import plan_cache

    return plan_cache


def mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """Forward of ``mira::mira_linear``: (B, T, d_out) in x's dtype (two kernel launches)."""
    lm = _launchers()
    y, plan = _plan_cache().plan_linear(x, weight, bias, query, keys, bank_a, bank_b, list(slice_offsets),
                                        separation, scale, eps)
    lm.run_all(plan, x.device)
    return y


def mira_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps,
                         output_mask):
    """Backward of ``mira::mira_linear``: (dx, dquery, dkeys, dbank_a, dbank_b), None where not asked."""
    lm = _launchers()
    grads, plan = _plan_cache().plan_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b,
                                                     list(slice_offsets), separation, scale, eps, list(output_mask))
    lm.run_all(plan, x.device)
    return grads


def mira_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """``mira::mira_adapter_``: adds the adapter into ``out`` in place."""
    lm = _launchers()
    target, plan = lm.plan_adapter_(out, x, query, keys, bank_a, bank_b, list(slice_offsets), separation,
                                           scale, eps)
    lm.run_all(plan, x.device)
    if target is not out:  # only the slices' columns: the others are not the op's to write
        width = bank_b.shape[2]
        for off in slice_offsets:
            out[..., off : off + width].copy_(target[..., off : off + width])


def normalize_columns(keys: torch.Tensor, eps: float) -> torch.Tensor:
    """Each column of keys (N, D) to unit L2 norm across the rows, ``F.normalize(keys, dim=0, eps=eps)``
    computed in fp64 and rounded once, in one launch (ATen takes three: norm, clamp, divide; and its
    overflow-safe form for 16-bit keys, mira.memory._unit_columns, ~34). (Under the interpreter,
    bfloat16 keys are rounded through float32: plan_normalize_columns.) No autograd: the layers use it
    where no graph is needed (mira/memory.py)."""
    lm = _launchers()
    out, launch = lm.plan_normalize_columns(keys, eps)
    lm.run_all([launch], keys.device)
    return out.to(keys.dtype)  # no copy where the kernel wrote the keys' dtype
