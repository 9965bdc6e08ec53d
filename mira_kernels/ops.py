"""The public MIRA ops: typed wrappers, per-dispatch-key routing kernels, fake kernels, autograd.

The schemas live once, in C++ (``csrc/mira_ops.cpp``), with the public ops' CPU/CUDA kernels: a
call whose ``backend`` names the key's native backend ("cpu", "cuda") goes straight to it. This
module registers the router for every other name (one kernel per dispatch key on the
``_routed_*`` ops, picking a backend by name: :mod:`mira_kernels.backends`) and the fake (meta)
kernels that ``torch.compile`` traces with. The autograd of ``mira_linear`` (one backward op
that returns every gradient) is C++ too, in ``csrc/mira_ops.cpp``.

What the forward saves: only its inputs. The backward recomputes scores, weights, mixed
factors and the shrink ``x A_b^T`` (together about ``S*r*(d_in + d_s)`` MACs per token, under 1%
of the base projection), so training needs no activation memory beyond the inputs the base
projection saves anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from . import _config, _extension, _validation, backends, reference
from .reference import DEFAULT_EPS

__all__ = ["mira_linear", "mira_adapter_", "retrieval_weights"]


def _autocast_inputs(x, weight, bias, memory):
    """Under torch.autocast, the casts PyTorch's autocast makes: x/weight/bias to the autocast dtype,
    the memory side to float32 (for a 16-bit autocast dtype).

    Only what ATen's autocast would cast (autocast_mode.h, ``is_eligible``): floating tensors other
    than float64. A float64 call stays float64, as ``F.linear``'s does, and a tensor that is not
    floating reaches the checks as it is, which refuse it as they do without autocast. Returns the
    tensors (unchanged when autocast is off for x's device, or does not know it: meta tensors).
    """
    device_type = x.device.type
    if not _autocast_enabled(device_type):
        return x, weight, bias, memory
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t, to):
        if t is None or t.dtype in (to, torch.float64) or not t.is_floating_point():
            return t
        return t.to(to)

    memory_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return cast(x, dtype), cast(weight, dtype), cast(bias, dtype), [cast(t, memory_dtype) for t in memory]


def _linear_autocast_kernel(device_type: str):
    """``mira::mira_linear``'s kernel at the autocast dispatch key of ``device_type``: the casts of
    :func:`_autocast_inputs`, then the op with that key excluded (as ``torch.library.register_autocast``
    does, whose one dtype for every input cannot keep the memory side in float32)."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    autocast_keys = torch._C.DispatchKeySet(key)

    def kernel(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend="auto"):
        x, weight, bias, memory = _autocast_inputs(x, weight, bias, (query, keys, bank_a, bank_b))
        query, keys, bank_a, bank_b = memory
        with torch._C._ExcludeDispatchKeyGuard(autocast_keys):
            return torch.ops.mira.mira_linear(
                x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend
            )

    return kernel


def _autocast_enabled(device_type: str) -> bool:
    # is_autocast_enabled raises for a device type autocast has no key for (meta), whose ops it never casts.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@contextlib.contextmanager
def _autocast_off(device_type: str):
    # Backends choose their own precisions; autocast must not re-cast the ops they call.
    if _autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


# ----------------------------------------------------------------------------------------------
# Per-dispatch-key kernels: one per key, routing by backend name.
# ----------------------------------------------------------------------------------------------


def _impl_for(backend: str, device: torch.device, dtype: torch.dtype):
    if backend == "auto":  # direct torch.ops.mira.* calls that did not resolve a name
        backend = backends.resolve_backend(device, dtype)
    return backends.implementation(backend)


# `backend="auto"`: the dispatcher leaves out trailing arguments equal to the schema's default.
def _linear_kernel(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend="auto"):
    device = x.device
    impl = _impl_for(backend, device, x.dtype)
    # The eager forward's hot path (benchmarks/host_path.py): a generator context manager costs
    # ~2 us a call, so it is entered only when there is autocast to switch off.
    if not torch.is_autocast_enabled(device.type):
        return impl.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)
    with _autocast_off(device.type):
        return impl.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)


def _linear_backward_kernel(
    grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, output_mask,
    backend="auto",
):
    impl = _impl_for(backend, x.device, x.dtype)
    with _autocast_off(x.device.type):
        grads = impl.mira_linear_backward(
            grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, output_mask
        )
    # The schema returns Tensors: a gradient not asked for is an empty tensor. Contiguous, as the
    # native backends allocate them and the fake kernel says (the reference's follow the inputs' strides).
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)


def _adapter_kernel(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend="auto"):
    impl = _impl_for(backend, x.device, x.dtype)
    with _autocast_off(x.device.type):
        impl.mira_adapter_(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)


# The fake kernels check their arguments: they run where the C++ checks of the op kernels do not
# (tracing under torch.compile, meta tensors, and any call with one input on the meta device,
# which the dispatcher sends here rather than to the CPU kernel).
# `backend="auto"`: a direct torch.ops.mira.* call on meta tensors leaves out the schema default.
def _linear_fake(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend="auto"):
    _validation.check_mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


def _linear_backward_fake(
    grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, output_mask,
    backend="auto",
):
    # Contiguous, whatever the inputs' strides: every backend returns its gradients so, and
    # empty_like (the inputs' strides) failed torch.compile's stride check for a permuted x or keys.
    like = (x, query, keys, bank_a, bank_b)
    return tuple(t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(like, output_mask))


def _adapter_fake(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, backend="auto"):
    _validation.check_mira_adapter(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)
    return None


if _extension.loaded:
    # The public ops' CPU/CUDA kernels are in C++ (csrc/mira_ops.cpp): a call naming the key's
    # native backend goes straight to it; every other backend name comes back here.
    _lib = torch.library.Library("mira", "IMPL")
    for _key in ("CPU", "CUDA"):
        _lib.impl("_routed_mira_linear", _linear_kernel, _key)
        _lib.impl("_routed_mira_linear_backward", _linear_backward_kernel, _key)
        _lib.impl("_routed_mira_adapter_", _adapter_kernel, _key)
    torch.library.register_fake("mira::mira_linear", _linear_fake)
    torch.library.register_fake("mira::mira_linear_backward", _linear_backward_fake)
    torch.library.register_fake("mira::mira_adapter_", _adapter_fake)
    # Autocast at dispatch level, where ATen's own is: torch.export records the op with its inputs
    # uncast, and a program casts them when it runs under autocast, as its ATen ops do. (Casts made in
    # Python before the call were baked into an exported program: run without autocast, its bfloat16
    # output then failed the next float32 Linear.)
    for _device_type in ("cpu", "cuda"):
        _lib.impl("mira_linear", _linear_autocast_kernel(_device_type),
                  "Autocast" + torch._C._dispatch_key_for_device(_device_type))


# ----------------------------------------------------------------------------------------------
# Public functions.
#
# Two paths. The eager path, taken whenever nothing needs Python before the op (no autocast, no
# finiteness check, not tracing): resolve the backend and call the op, whose C++ kernel checks
# the arguments (csrc/validation.h). Python's checks would cost ~0.3-0.5% of a ViT-B/16 qkv
# projection here: the call follows a large GEMM that has evicted the interpreter's caches. When
# the op raises, the Python checks run and raise the documented error if an argument is bad;
# otherwise the op's own error is re-raised. The traced path (the rest) checks in Python first:
# under torch.compile the checks run once, at trace time.
# ----------------------------------------------------------------------------------------------


def _eager_backend(x: torch.Tensor) -> str | None:
    """The backend of a call that may leave its checks to the op's C++ kernel (see above), else None.

    Every Python frame here costs ~5-10 us with cold caches, so the common case, a CPU tensor
    with the CPU kernel built and no other backend asked for, skips the general resolution.
    """
    # is_compiling() before the rest: under torch.compile, Dynamo stops here and traces the
    # Python path instead.
    if (
        not _extension.loaded
        or not isinstance(x, torch.Tensor)
        or torch.compiler.is_compiling()
        or torch._C._is_any_autocast_enabled()
        or _config.check_finite_enabled()
    ):
        return None
    requested = _config.requested_backend()
    if x.is_cpu and (requested is None or requested == "cpu") and _extension.has_kernel("_cpu_mira_linear", "CPU"):
        return "cpu"
    return backends.resolve_backend(x.device, x.dtype)


# The op's argument parser takes lists and tuples and rejects any other sequence. It also reads a
# bool as 0 / 1 and truncates numpy float32 scalars and float tensors (15.9 -> 15), which
# _validation.as_offsets refuses, as the checked paths do: so only a list or tuple of Python ints
# (type() is int, not bool) goes straight to the op on the eager path, and every other form (numpy
# ints, tensors, a range) through that conversion, a ~14 us call with cold caches. The test is a loop
# written in place: ~120 ns for two offsets (warm), where `bool in map(type, ...)` cost ~190 ns and
# all() over a generator expression ~280 ns (its frame).
_PARSED_SEQUENCES = (list, tuple)


def _recheck(check, *args) -> None:
    """Runs the Python checks on a call the op rejected: their documented TypeError or ValueError goes
    to the caller. Any other exception means they could not judge these arguments (a functorch
    BatchedTensor has no data pointer to compare), and the caller re-raises the op's own error."""
    try:
        check(*args)
    except (TypeError, ValueError):
        raise
    except Exception:  # noqa: BLE001 - the op's error says more than a check that could not run
        pass


def _check_scalars(scale, eps) -> None:
    # Before anything converts them with float(), which would take "2": a str is a TypeError on
    # every path (the op's C++ checks see only the converted doubles). A float passes at once.
    if type(scale) is not float:
        _validation.check_real("scale", scale)
    if type(eps) is not float:
        _validation.check_real("eps", eps)


def _check_frozen(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError(
            "mira_linear: weight and bias are the frozen base projection and get no gradient, but "
            "requires_grad is set on them; freeze them (requires_grad_(False)) or run under torch.no_grad()"
        )


# PyTorch's own errors for a C++ autograd Function under torch.func's grad transforms and forward-mode
# AD: they name neither the op nor what to use instead (the forward-AD one asks for a PyTorch feature
# request). Re-raised by _explained with what contract section 5 says.
_TRANSFORM_ERRORS = ("cannot use C++ torch::autograd::Function with functorch transforms",
                     "jvp is not implemented for the c++ API of custom Function")


def _explained(error: Exception) -> Exception:
    """``error``, or for an unsupported transform an error that names the op and the way out."""
    if isinstance(error, RuntimeError) and any(m in str(error) for m in _TRANSFORM_ERRORS):
        explained = RuntimeError(
            "mira_linear does not support torch.func's grad / vjp / jacrev / jacfwd / jvp or forward-mode AD "
            "(torch.autograd.forward_ad): its autograd is a C++ Function (docs/contract.md section 5). Use the "
            "plain-PyTorch mira_kernels.reference.mira_linear for those (torch.vmap runs the op itself)")
        explained.__cause__ = error
        return explained
    return error


def _has_tangent(tensors) -> bool:
    """Whether forward-mode AD is active and one of ``tensors`` is a dual tensor (its tangent set)."""
    if getattr(torch.autograd.forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _check_inference_only(out: torch.Tensor, *tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, *tensors)):
        raise RuntimeError(
            "mira_adapter_ is inference-only and has no autograd; use mira_linear for training, "
            "or call it under torch.no_grad() / torch.inference_mode()"
        )
    # A dual tensor has a tangent but no requires_grad (and forward AD runs under no_grad): out was left
    # with no tangent for the adapter's part, silently (found by probing).
    if _has_tangent((out, *tensors)):
        raise RuntimeError(
            "mira_adapter_ is inference-only and has no forward-mode AD either; one of its inputs is a dual "
            "tensor (torch.autograd.forward_ad): use mira_kernels.reference's functions for tangents"
        )
    # ATen's own check comes after the kernel has written (as for add_): refused here, out is unchanged.
    # (Eager only: Dynamo cannot trace is_inference(), and a traced call's out is checked when it runs.)
    if not torch.compiler.is_compiling() and out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            "mira_adapter_: out is an inference tensor (made under torch.inference_mode()), which cannot be "
            "updated in place outside inference mode; call it under torch.inference_mode(), or pass out.clone()"
        )


def mira_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """A frozen linear projection with MIRA's per-sample adapter fused in.

    ``y = x W^T + bias``; then for every slice s, ``y[..., off_s:off_s+d_s] += scale * (x A_b,s^T) B_b,s^T``
    where ``A_b = sum_n w[b,n] bank_a[n]``, ``B_b = sum_n w[b,n] bank_b[n]`` and
    ``w = sep(cos(query, keys))``. Contract: ``docs/contract.md``.

    Args:
        x: (B, T, d_in) tokens; float32, float64, float16 or bfloat16.
        weight: (d_out, d_in) frozen weight, x's dtype (no gradient).
        bias: (d_out,) frozen bias or None.
        query: (B, d_k) one query per sample.
        keys: (N, d_k) memory keys (N may be 0).
        bank_a: (N, S, r, d_in) stored A factors.
        bank_b: (N, S, d_s, r) stored B factors.
        slice_offsets: S output offsets; slices of width d_s must fit in d_out and not overlap.
        separation: affine | softmax | relu | tanh | sigmoid | identity.
        scale: multiplies the adapter's contribution.
        eps: guard of the affine denominator: |sum s| is clamped to >= eps, sign kept.

    Returns:
        (B, T, d_out) tensor of x's dtype. Differentiable in x, query, keys, bank_a, bank_b.
    """
    _check_scalars(scale, eps)
    backend = _eager_backend(x) if type(separation) is str else None  # bytes: judged by the traced path
    if backend is not None:
        try:
            _check_frozen(weight, bias)
            if type(slice_offsets) not in _PARSED_SEQUENCES:
                slice_offsets = _validation.as_offsets(slice_offsets)
            else:
                for offset in slice_offsets:  # a loop in place: no generator frame (see _PARSED_SEQUENCES)
                    if type(offset) is not int:
                        slice_offsets = _validation.as_offsets(slice_offsets)
                        break
            return torch.ops.mira.mira_linear(
                x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, float(scale), float(eps),
                backend,
            )
        except Exception as e:  # noqa: BLE001 - re-raised below unless an argument is at fault
            error = e
        _recheck(
            _validation.check_mira_linear, x, weight, bias, query, keys, bank_a, bank_b,
            _validation.as_offsets(slice_offsets), separation, scale, eps,
        )
        raise _explained(error)

    slice_offsets = _validation.as_offsets(slice_offsets)
    _validation.check_tensors(x=x, weight=weight, bias=bias, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    memory = (query, keys, bank_a, bank_b)
    if _extension.loaded and torch.compiler.is_exporting() and _autocast_enabled(x.device.type):
        # torch.export under autocast: checked as cast, called uncast. The op's autocast kernel casts when
        # the program runs under autocast; a cast traced here would be in the program for every run. The
        # checks' casts are made untraced (Dynamo, in a strict export, cannot trace that context manager:
        # the casts it records there have no user, and decompose / AOTInductor drop them).
        untraced = contextlib.nullcontext() if torch.compiler.is_dynamo_compiling() else disable_proxy_modes_tracing()
        with untraced:
            checked = _autocast_inputs(x, weight, bias, memory)
    else:
        checked = _autocast_inputs(x, weight, bias, memory)
        x, weight, bias, (query, keys, bank_a, bank_b) = checked
    cast_x, cast_weight, cast_bias, cast_memory = checked
    _validation.check_mira_linear(cast_x, cast_weight, cast_bias, *cast_memory, slice_offsets, separation, scale, eps)
    _check_frozen(weight, bias)
    if _config.check_finite_enabled():
        _validation.check_finite(x=x, weight=weight, bias=bias, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    backend = backends.resolve_backend(x.device, cast_x.dtype)
    if not _extension.loaded:  # the router already warned that it fell back
        return reference.mira_linear(
            x, weight, bias, query, keys, bank_a, bank_b,
            slice_offsets=slice_offsets, separation=separation, scale=scale, eps=eps,
        )
    try:
        return torch.ops.mira.mira_linear(
            x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, float(scale), float(eps),
            backend,
        )
    except RuntimeError as error:
        raise _explained(error)  # noqa: B904 - the original, or one whose __cause__ is it


def mira_adapter_(
    out: torch.Tensor,
    x: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    bank_a: torch.Tensor,
    bank_b: torch.Tensor,
    *,
    slice_offsets: Sequence[int],
    separation: str = "affine",
    scale: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Adds MIRA's per-sample update in place into an existing projection output ``out``.

    Inference only (no autograd). ``out`` is (B, T, d_out) with x's dtype; other arguments as
    :func:`mira_linear`. Returns ``out``. A separate pass re-reads x and read-modify-writes the
    slices of ``out``; :func:`mira_linear` avoids that traffic by fusing the two.
    """
    _check_scalars(scale, eps)
    backend = _eager_backend(x) if type(separation) is str else None  # bytes: judged by the traced path
    if backend is not None:
        try:
            _check_inference_only(out, x, query, keys, bank_a, bank_b)
            if type(slice_offsets) not in _PARSED_SEQUENCES:
                slice_offsets = _validation.as_offsets(slice_offsets)
            else:
                for offset in slice_offsets:  # a loop in place: no generator frame (see _PARSED_SEQUENCES)
                    if type(offset) is not int:
                        slice_offsets = _validation.as_offsets(slice_offsets)
                        break
            torch.ops.mira.mira_adapter_(
                out, x, query, keys, bank_a, bank_b, slice_offsets, separation, float(scale), float(eps), backend
            )
            return out
        except Exception as e:  # noqa: BLE001 - re-raised below unless an argument is at fault
            error = e
        _recheck(
            _validation.check_mira_adapter, out, x, query, keys, bank_a, bank_b,
            _validation.as_offsets(slice_offsets), separation, scale, eps,
        )
        raise error

    slice_offsets = _validation.as_offsets(slice_offsets)
    _validation.check_tensors(x=x, out=out, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    _validation.check_mira_adapter(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)
    _check_inference_only(out, x, query, keys, bank_a, bank_b)
    if _config.check_finite_enabled():
        _validation.check_finite(out=out, x=x, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    backend = backends.resolve_backend(x.device, x.dtype)
    if not _extension.loaded:
        reference.mira_adapter_(
            out, x, query, keys, bank_a, bank_b,
            slice_offsets=slice_offsets, separation=separation, scale=scale, eps=eps,
        )
        return out
    torch.ops.mira.mira_adapter_(
        out, x, query, keys, bank_a, bank_b, slice_offsets, separation, float(scale), float(eps), backend
    )
    return out


# The eval fast path on CPU (csrc/cpu/fast_path.cpp): the kernel without the dispatcher, for calls
# where it has nothing to add. None where the extension is not built.
_cpu_eval_linear = getattr(getattr(_extension, "_C", None), "_cpu_eval_linear", None)
# Bound once (the same function, which Dynamo folds to True when tracing): read cold after a
# network's GEMMs, the torch.compiler attribute chain cost 2.0 us [1.7, 2.3] per call (Zen 3).
_is_compiling = torch.compiler.is_compiling


def eval_linear_cpu(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """:func:`mira_linear` of a plain eval call on CPU tensors, or None when the call needs the op.

    Positional arguments as :func:`mira_linear`'s, ``slice_offsets`` a tuple or list of ints;
    ``query`` may also be a token index ``i``, meaning ``x[:, i]``. The result is the op's, bit
    for bit. It takes the call only when the op's routing and the dispatcher would add nothing:
    the CPU kernel is built and chosen (no other backend forced, no finiteness check, not traced by
    ``torch.compile``), and, checked in C++, the tensors are plain CPU tensors, no autograd graph is
    needed, and no autocast, dispatch mode or torch-function mode is active. For MIRA layers in
    eval, where a Python-level op costs tens of microseconds after the large GEMMs of a network.
    """
    if (
        _cpu_eval_linear is None
        or _is_compiling()
        or _config.requested_backend() not in (None, "cpu")
        or _config.check_finite_enabled()
    ):
        return None
    return _cpu_eval_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)


# A prepared eval call (csrc/eval_plan.cpp); None where the extension is not built.
_EvalPlan = getattr(getattr(_extension, "_C", None), "_EvalPlan", None)

#: The expected "object" of an eval-plan guard whose key must be absent from its dict.
PLAN_ABSENT = object()


def eval_plan(weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, *, query_fn,
              guards, empty, sources, x_dtypes):
    """A prepared :func:`eval_linear_cpu` call, ``plan(x) -> y or None``, or None where none can be made.

    Arguments as :func:`eval_linear_cpu`'s without x (``query`` a token index, or None with
    ``query_fn(x)`` making the query); the plan replays them while ``guards`` (``(dict, key,
    object)``: ``dict[key] is object``, :data:`PLAN_ABSENT` for an absent key) and ``empty``
    (dicts) hold, ``sources`` (tensors the arguments were derived from) keep their data address,
    version, dtype, sizes and strides, and x's dtype is in ``x_dtypes`` (any when empty). It
    checks the settings :func:`eval_linear_cpu` reads (backend, finiteness check) itself; none is
    made while one of their environment variables is set. Once a
    guard or source has changed it answers None for good and ``plan.stale`` is True: make a new one.
    The caller guards every object whose change would change the call; csrc/eval_plan.cpp says why.
    """
    if _EvalPlan is None or _cpu_eval_linear is None or _is_compiling():
        return None
    variables, environ, env_keys = _config.call_time_reads()
    if environ is None or any(k in environ for k in env_keys):
        return None
    guards = (*guards, *((environ, k, PLAN_ABSENT) for k in env_keys))
    args = (None, weight, bias, query, keys, bank_a, bank_b, tuple(slice_offsets), separation, scale, eps)
    return _EvalPlan(_cpu_eval_linear, args, query_fn, guards, tuple(empty), variables, tuple(sources),
                     tuple(x_dtypes), PLAN_ABSENT)


def retrieval_weights(
    query: torch.Tensor, keys: torch.Tensor, *, separation: str = "affine", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The association matrix w = sep(cos(query, keys)), (B, N), differentiable.

    Computed in plain PyTorch (it is O(B N d_k), tiny next to the projection): float32 for
    16-bit inputs, else the inputs' dtype.
    """
    _validation._check_rank("query", query, 2, "(B, d_k)")
    _validation._check_rank("keys", keys, 2, "(N, d_k)")
    if query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"query (B, d_k) and keys (N, d_k) must share d_k, got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    if query.device != keys.device:
        raise ValueError(f"query is on {query.device} but keys are on {keys.device}")
    for name, t in (("query", query), ("keys", keys)):
        # The dtypes the ops take (float8 is floating, but failed deep inside PyTorch).
        if t.dtype not in _validation._FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), got {t.dtype}")
    _validation.check_separation(separation)
    _validation.check_eps(eps)
    if _config.check_finite_enabled():  # the switch checks every op's inputs, this one's too
        _validation.check_finite(query=query, keys=keys)
    # The weights the op uses, which runs its memory side with autocast off (float32 for 16-bit inputs):
    # under autocast the cosines were bfloat16, 0.4 off near the affine guard.
    with _autocast_off(query.device.type):
        return reference.retrieval_weights(query, keys, separation=separation, eps=float(eps))
