"""Replayed launch plans of ``mira_linear`` and its backward: planned once per argument signature,
then refilled per call.

Why: the forward's planner (:func:`.launchers.plan_linear`) costs ~33-58 us of Python per call on a
2-core EPYC, the backward's ~2.7x that (``python -m benchmarks.host_path``,
``benchmarks/results/host_path.md``), and an eager call pays it every time although the plan depends
only on what the key below holds. A hit allocates the plan's outputs and workspaces afresh (the
same sizes and dtypes, zero-filled where the planner zero-fills: the backward's gradients; nothing is
shared between calls, so a CUDA graph or a second stream sees what an uncached call gives) and
launches the recorded kernels with the recorded grids and arguments, the tensor arguments replaced
by this call's. The backward's key adds grad_out and the output mask.

The key holds everything the planner reads: every tensor's shape, strides, dtype and device (and
whether bias is None), the slice offsets, the separation, the bit patterns of scale and eps, the
dot precisions for x's dtype (``allow_tf32`` for float32), the target capability and whether the
interpreter plans. Plans made under :func:`.configs.overriding` (sweeps) are never cached. The
planner does not read data pointers, so tensors that alias each other get the same plan; a plan
is recorded only when each tensor argument of its launches is unambiguously one input (the very
pointer and dtype) or one allocation the planner made with ``empty`` or ``zeros``: a plan that
copied an input (a non-contiguous x or bank, whose copy holds data) or whose arguments cannot be
told apart is planned afresh on every call. A call that fails records nothing (the template is stored after a
successful plan, and it never depends on the call's data).

Used for CUDA tensors only (:data:`DEVICE_TYPES`): the interpreter's tests keep planning every
call (and may monkeypatch the planner's configs, which the key does not see). Tests add ``"cpu"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import configs, kernels, launchers

#: Device types whose calls use the cache.
DEVICE_TYPES = {"cuda"}
#: Signatures kept; past it the cache starts again (a model has a handful of shapes per layer).
MAX_ENTRIES = 512

_CACHE: dict[tuple, _Template] = {}
#: Keys whose plan cannot be replayed (a copied input, zero-size inputs): the verdict depends only on
#: the key (the probes are always distinct), so such a call plans once, on its real inputs, not first
#: on probes as well.
_UNCACHEABLE: set[tuple] = set()


def clear() -> None:
    _CACHE.clear()
    _UNCACHEABLE.clear()


# A replay lines up this call's tensors in one list of slots: the inputs (the planner's tensor
# arguments, in order), then the fresh allocations (the outputs first), then the zero-size
# workspaces (no memory: made once, at recording, and shared by every call); each tensor
# argument of a launch names its slot.


@dataclass(frozen=True)
class _LaunchTemplate:
    kernel_name: str
    grid: tuple[int, ...]
    kwargs: dict  # every keyword of kernel[grid](...) but the tensors
    fills: tuple[tuple[str, int], ...]  # (keyword, slot)
    #: The kernel's parameters in order, and the keywords filled from the inputs (for DIRECT_LAUNCH).
    arg_names: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ()
    #: DIRECT_LAUNCH: the compiled kernel Triton returned, per 16-byte alignment of the inputs' pointers.
    compiled: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class _Template:
    fresh: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]  # (shape, dtype, zero-filled)
    empties: tuple[torch.Tensor, ...]
    launches: tuple[_LaunchTemplate, ...]
    outputs: tuple[int | None, ...]  # the planner's returned tensors: fresh indices (None stays None)


#: Opt-in, off by default until a GPU run has checked it (tests/test_host_path.py, on CUDA): replayed
#: launches go through the ``CompiledKernel`` that ``kernel[grid](...)`` returned on the first replay,
#: ``compiled[grid](*args)``, skipping ``JITFunction.run``'s binder and cache key (~15 us per launch,
#: estimated: results/host_path.md). Sound because a template fixes every argument Triton specialises
#: on (ints, constexprs, options, the tensors' dtypes) except the pointers' 16-byte alignment, which
#: is part of the lookup (fresh allocations are always aligned; inputs may not be). Skipped with it:
#: Triton's check that a kernel's global variables did not change since it compiled (ours read none
#: that change) and pre-run hooks (ours have none).
DIRECT_LAUNCH = False


def _is_compiled(kernel) -> bool:
    return kernel is not None and hasattr(kernel, "packed_metadata") and hasattr(kernel, "__getitem__")


class _Replayed:
    """A launch of a replayed plan: ``run()`` as :meth:`.launchers.Launch.run`."""

    __slots__ = ("kernel", "grid", "kwargs", "template")

    def __init__(self, kernel, grid, kwargs, template=None):
        self.kernel, self.grid, self.kwargs, self.template = kernel, grid, kwargs, template

    def run(self) -> None:
        if not DIRECT_LAUNCH or self.template is None or not self.template.arg_names:
            self.kernel[self.grid](**self.kwargs)
            return
        kw, lt = self.kwargs, self.template
        alignment = tuple(kw[name].data_ptr() % 16 == 0 for name in lt.input_names)
        compiled = lt.compiled.get(alignment)
        if compiled is not None:
            grid = self.grid
            compiled[(*grid, *(1,) * (3 - len(grid)))](*[kw[name] for name in lt.arg_names])
            return
        compiled = self.kernel[self.grid](**kw)
        if _is_compiled(compiled):  # the interpreter returns nothing: it keeps this path
            lt.compiled[alignment] = compiled


def key(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps) -> tuple:
    """Everything :func:`.launchers.plan_linear` reads (module doc). Devices: every input's, since
    the planner is also called directly (the op has checked that they agree)."""
    return (
        x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype, weight.device,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
        query.shape, query.stride(), query.dtype, query.device, keys.shape, keys.stride(), keys.dtype, keys.device,
        bank_a.shape, bank_a.stride(), bank_a.dtype, bank_a.device,
        bank_b.shape, bank_b.stride(), bank_b.dtype, bank_b.device,
        tuple(slice_offsets), separation, launchers.float_bits(scale), launchers.float_bits(eps),
        launchers._precisions(x.dtype), launchers.target_capability(x.device), launchers.interpreting(),
    )


class _Allocations(TorchDispatchMode):
    """Records the data pointers of tensors the planner creates with ``empty`` (data-free), and
    whether it created any other tensor with storage of its own (a copy: data the replay lacks)."""

    _EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
              torch.ops.aten.empty_like.default}
    _ZEROS = {torch.ops.aten.zeros.default}  # the backward's gradients: a replay zero-fills them too

    def __init__(self):
        super().__init__()
        self.empty_ptrs: set[int] = set()
        self.zero_ptrs: set[int] = set()
        self.copied = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._EMPTY:
            self.empty_ptrs.add(out.data_ptr())
        elif func in self._ZEROS:
            self.zero_ptrs.add(out.data_ptr())
        elif func._schema.is_mutable or not _is_view(func):
            self.copied = True
        return out


def _is_view(func) -> bool:
    # An op whose tensor output aliases its input (view, as_strided, alias ...): no new data.
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None for r in returns)


def _record(inputs, outputs, launches, recorder: _Allocations) -> _Template | None:
    """The plan made on ``inputs`` (distinct probes) as a template, or None when one of its tensor
    arguments is not one input or one ``empty`` allocation of the planner (module doc)."""
    by_ptr: dict[int, int] = {}
    for i, t in enumerate(inputs):
        if t is not None:
            if t.data_ptr() in by_ptr or t.untyped_storage().nbytes() == 0:
                return None  # zero-size probes have no memory of their own to tell them apart
            by_ptr[t.data_ptr()] = i
    empty_ptrs, zero_ptrs = recorder.empty_ptrs, recorder.zero_ptrs
    fresh_ptrs: dict[int, int] = {}
    fresh = []
    out_slots = []
    for t in outputs:
        if t is None:
            out_slots.append(None)
            continue
        ptr = t.data_ptr()
        if t.untyped_storage().nbytes() == 0 or ptr in fresh_ptrs or ptr in by_ptr or not (
                ptr in empty_ptrs or ptr in zero_ptrs) or t.untyped_storage().data_ptr() != ptr:
            return None
        fresh_ptrs[ptr] = len(fresh)
        out_slots.append(len(fresh))
        fresh.append((tuple(t.shape), t.dtype, ptr in zero_ptrs))
    empties: dict[torch.dtype, int] = {}
    fills_of = []  # per launch: (keyword, kind, index)
    records = []
    for launch in launches:
        if any(g == 0 for g in launch.grid):
            continue  # Launch.run skips it; it depends only on shapes, which the key holds
        kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
        if launch.pdl:
            kwargs["launch_pdl"] = True
        if launch.maxnreg is not None:
            kwargs["maxnreg"] = launch.maxnreg
        fills = []
        for name, value in launch.args.items():
            if not isinstance(value, torch.Tensor):
                kwargs[name] = value
                continue
            ptr, dtype = value.data_ptr(), value.dtype
            if ptr in by_ptr:
                i = by_ptr[ptr]
                if inputs[i].dtype != dtype:
                    return None
                fills.append((name, "input", i))
            elif value.untyped_storage().nbytes() == 0:
                fills.append((name, "empty", empties.setdefault(dtype, len(empties))))
            elif ptr in fresh_ptrs:
                j = fresh_ptrs[ptr]
                if fresh[j][1] != dtype:
                    return None
                fills.append((name, "fresh", j))
            elif (ptr in empty_ptrs or ptr in zero_ptrs) and value.untyped_storage().data_ptr() == ptr:
                fresh_ptrs[ptr] = len(fresh)
                fresh.append(((value.untyped_storage().nbytes() // value.element_size(),), dtype, ptr in zero_ptrs))
                fills.append((name, "fresh", fresh_ptrs[ptr]))
            else:
                return None  # a copy, or a view into the middle of something
        records.append((launch.kernel.fn.__name__, tuple(launch.grid), kwargs,
                        tuple(getattr(launch.kernel, "arg_names", ()))))
        fills_of.append(fills)
    base = {"input": 0, "fresh": len(inputs), "empty": len(inputs) + len(fresh)}
    device = next(t.device for t in inputs if t is not None)
    return _Template(
        tuple(fresh), tuple(torch.empty(0, dtype=d, device=device) for d in empties),
        tuple(_LaunchTemplate(name, grid, kwargs, tuple((kw, base[kind] + index) for kw, kind, index in fills),
                              arg_names, tuple(kw for kw, kind, _ in fills if kind == "input"))
              for (name, grid, kwargs, arg_names), fills in zip(records, fills_of)),
        tuple(out_slots))


def _replay(template: _Template, inputs, device) -> tuple[tuple, list[_Replayed]]:
    fresh = [(torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
             for shape, dtype, zero in template.fresh]
    slots = (*inputs, *fresh, *template.empties)
    launches = []
    for lt in template.launches:
        kw = dict(lt.kwargs)
        for name, slot in lt.fills:
            kw[name] = slots[slot]
        launches.append(_Replayed(getattr(kernels, lt.kernel_name), lt.grid, kw, lt))
    return tuple(None if j is None else fresh[j] for j in template.outputs), launches


def _cached(planner, k, inputs: tuple, rest: tuple, outputs_of):
    """``planner(*inputs, *rest)`` replayed from the cache under key ``k`` where it can be (module doc).
    ``outputs_of`` maps the planner's first result to a tuple of tensors (or None)."""
    template = _CACHE.get(k)
    device = inputs[0].device
    if template is not None:
        return _replay(template, inputs, device)
    if k in _UNCACHEABLE:
        return None
    # Planned once on probes: empty tensors of the inputs' shapes, strides, dtypes and devices, each
    # with its own memory, so every tensor argument of the plan names one input (the planner reads
    # no pointers, so the template holds for any aliasing of the real inputs).
    probes = tuple(None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                   for t in inputs)
    recorder = _Allocations()
    with recorder:
        result, launches = planner(*probes, *rest)
    template = None if recorder.copied else _record(probes, outputs_of(result), launches, recorder)
    if len(_CACHE) + len(_UNCACHEABLE) >= MAX_ENTRIES:
        clear()
    if template is None:
        _UNCACHEABLE.add(k)
        return None
    _CACHE[k] = template
    return _replay(template, inputs, device)


def _use_cache(device: torch.device) -> bool:
    return device.type in DEVICE_TYPES and len(configs._OVERRIDES) == 1


def plan_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps):
    """:func:`.launchers.plan_linear`, replayed from the cache where it can be (module doc).

    Returns (y, launches); each launch has ``run()``, for :func:`.launchers.run_all`.
    """
    args = (x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps)
    if _use_cache(x.device):
        replayed = _cached(launchers.plan_linear, ("linear", *key(*args)), args[:7], args[7:], lambda y: (y,))
        if replayed is not None:
            (y,), launches = replayed
            return y, launches
    return launchers.plan_linear(*args)


def plan_linear_backward(grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps,
                         output_mask):
    """:func:`.launchers.plan_linear_backward`, replayed from the cache where it can be: returns
    ((dx, dquery, dkeys, dbank_a, dbank_b), launches), None where a gradient is not asked for."""
    args = (grad_out, x, weight, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps, output_mask)
    if _use_cache(x.device):
        k = ("linear_backward", grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device,
             *key(x, weight, None, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps),
             tuple(bool(m) for m in output_mask))
        replayed = _cached(launchers.plan_linear_backward, k, args[:7], args[7:], tuple)
        if replayed is not None:
            return replayed
    return launchers.plan_linear_backward(*args)
