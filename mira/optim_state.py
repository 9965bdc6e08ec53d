"""A clear error when an optimiser still holds state of a memory from before it grew or its slots moved.

A growing memory (``capacity=None``) keeps its ``keys`` Parameter object across an append or a
remove but changes its shape, so an optimiser's per-parameter state (Adam's moments, SGD's
momentum) has the old shape and its next step would fail deep inside the update with a
broadcasting error. Once any memory has been resized, a step pre-hook common to all optimisers
(``torch.optim.optimizer.register_optimizer_step_pre_hook``, registered on the first resize)
checks the resized tensors' state first and names the cure: :func:`forget_optimizer_state`.

The check compares shapes, in the state entries that mirror the parameter in PyTorch's
optimisers and in Adafactor's factored row and column statistics (the parameter's shape with its
last, or second-to-last, dimension 1).

Slots can also move without any change of shape: ``remove`` compacts the stored adapters (and
``clear``, ``select_tasks`` and ``load_memories`` replace them) in a fixed-capacity memory, or in a
growing one that then grows back to its old size. The state would then update each slot with the
moments of another. So at every such move the state that optimisers which have stepped in this
process hold of the memory's tensors is marked stale, and the same hook refuses their next step until
:func:`forget_optimizer_state` drops it. To know those optimisers, the hook is registered as soon as
a memory is made (it records each optimiser that steps; the checks cost nothing while no memory
has changed).

Only optimisers that have stepped in this process are known. State loaded into an optimiser
(``optimizer.load_state_dict``, resuming from a checkpoint) that has not stepped since is not: a
move of the slots before its first step is not seen, and that step updates each slot with the
moments of another, unrefused. Load an optimiser's state after the memory changes (so that it
describes the slots as they are), or drop it with :func:`forget_optimizer_state` after them.

A step post-hook, registered with the pre-hook, bumps the version counters of the parameters that
torch's fused optimisers (``fused=True``: Adam, AdamW, SGD, Adagrad) updated: their kernels write the
parameters in place without bumping them, as every other in-place update does, and the memory's
retrieval cache and the layers' eval plans know an optimiser step by that counter alone.
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping

import torch
import torch.nn as nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

__all__ = ["check_optimizer", "forget_optimizer_state", "note_resized"]

# Per-parameter state entries of torch.optim's optimisers that have the parameter's shape.
_MIRRORED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                   "grad_avg", "acc_delta", "sum", "ax", "prev", "step_size", "variance")


def _expected_shapes(shape: torch.Size) -> dict[str, tuple[int, ...]]:
    """Each checked state entry's shape for a parameter of ``shape``."""
    expected = dict.fromkeys(_MIRRORED_STATE, tuple(shape))
    if len(shape) >= 2:  # torch.optim.Adafactor's factored second moment
        expected["row_var"] = (*shape[:-1], 1)
        expected["col_var"] = (*shape[:-2], 1, shape[-1])
    return expected

# ids of the memory tensors that have been resized. Ids, not the tensors, nor weak references to
# them: torch.utils.swap_tensors (model.to / .double() / load_state_dict under
# torch.__future__.set_swap_module_params_on_conversion(True)) refuses any tensor that has a weak
# reference. An id may be reused by another tensor once one dies; the check then runs on that
# tensor too, where it passes unless the state is truly of another shape (its optimiser made the
# state in its shape), and a step with such state would fail anyway, in the update.
_resized: set[int] = set()
_stepped: weakref.WeakSet = weakref.WeakSet()  # optimisers that have stepped since the hook was registered
# optimiser -> ids of memory tensors whose state in it is from before their slots moved
_stale: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook = None
_post_hook = None


def watch() -> None:
    """Register the step hooks (once per process; every memory calls it when it is made), so that
    every optimiser that steps is known before a memory's slots move, and a fused step is seen."""
    global _hook, _post_hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_state)
    if _post_hook is None:
        _post_hook = register_optimizer_step_post_hook(_bump_fused_versions)


def note_resized(*tensors: torch.Tensor) -> None:
    """Record memory tensors whose shape just changed (called by the memory when it resizes)."""
    _resized.update(id(t) for t in tensors if isinstance(t, nn.Parameter))
    watch()


def _bump_fused_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # torch's fused kernels (fused=True) write the parameters in place without bumping their version
    # counters (PyTorch 2.14: SGD([p], fused=True).step() leaves p._version at 0), so the memory's
    # retrieval cache and the layers' eval plans, keyed on (address, version), replayed the keys of
    # before the step. Every parameter of a fused group that has a gradient (those the kernel
    # updates) is bumped, not only the memories' tensors: bumping is what the in-place update should
    # have done, and telling memory tensors apart would need references to them (ids are reused;
    # weak references block swap_tensors). A spurious bump (a step the GradScaler skipped) costs a
    # cache miss.
    for group in optimizer.param_groups:
        if group.get("fused"):
            _bump([p for p in group["params"] if p.grad is not None])


@torch.compiler.disable  # run eagerly: traced by Dynamo (a compiled step), the bump was lost (version unmoved)
def _bump(params: list[torch.Tensor]) -> None:
    try:
        increment_version(params)
    except RuntimeError:
        # A parameter without a version counter (made under inference_mode, its data swapped for an
        # ordinary tensor): nothing can be keyed on its version; bump the others.
        for p in params:
            try:
                increment_version(p)
            except RuntimeError:
                pass


def note_moved(*tensors: torch.Tensor) -> None:
    """Record memory tensors whose slots just moved or were replaced (called by the memory): the state
    that optimisers which have stepped in this process hold of them now belongs to other slots. (State
    that an optimiser made before it ever stepped, such as Adagrad's initial sums, is the same for every
    slot; state loaded into one that has not stepped since is not seen: see the module docstring.)"""
    params = [t for t in tensors if isinstance(t, nn.Parameter)]
    for optimizer in list(_stepped):
        held = {id(p) for p in params if p in optimizer.state}  # a defaultdict: test, never index
        if held:
            _stale.setdefault(optimizer, set()).update(held)
    watch()


def _check_state(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    _stepped.add(optimizer)
    _check_shapes(optimizer)
    _check_moves(optimizer)


def _check_moves(optimizer: torch.optim.Optimizer) -> None:
    stale = _stale.get(optimizer)
    if not stale:
        return
    state = optimizer.state
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in stale:
                continue
            if param not in state:  # forgotten (forget_optimizer_state): what it makes from here on is new
                stale.discard(id(param))
                continue
            raise RuntimeError(
                f"{type(optimizer).__name__}.step: it holds state of a MIRA memory tensor of shape "
                f"{tuple(param.shape)} whose slots have moved or been replaced since (remove, clear, "
                "select_tasks, load_memories): the step would update each slot with the moments of another. "
                "Call mira.forget_optimizer_state(model, optimizer) (or memory.forget_optimizer_state(optimizer)) "
                "after changing a memory, or build a new optimizer; nothing was updated"
            )


def _check_shapes(optimizer: torch.optim.Optimizer) -> None:
    if not _resized:
        return
    state = optimizer.state
    for param in [p for group in optimizer.param_groups for p in group["params"] if id(p) in _resized]:
        if param not in state:  # a defaultdict: test, never index
            continue
        for key, shape in _expected_shapes(param.shape).items():
            held = state[param].get(key)
            if isinstance(held, torch.Tensor) and held.dim() and tuple(held.shape) != shape:
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step: its state {key!r} of a MIRA memory tensor has shape "
                    f"{tuple(held.shape)}, but the tensor now has shape {tuple(param.shape)}: the memory grew or "
                    "shrank (write_adapters, append, remove, load) after the optimizer last stepped. Call "
                    "mira.forget_optimizer_state(model, optimizer) (or memory.forget_optimizer_state(optimizer)) "
                    "after changing a memory, or build a new optimizer; nothing was updated"
                )


def check_optimizer(optimizer, what: str) -> None:
    """Raise a TypeError naming ``what`` unless ``optimizer`` holds per-parameter state as torch's do."""
    if not isinstance(getattr(optimizer, "state", None), MutableMapping):  # None.state: an AttributeError
        raise TypeError(f"{what}: optimizer must be a torch.optim.Optimizer (its per-parameter state is dropped), "
                        f"got {type(optimizer).__name__}")


def forget_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Drop ``optimizer``'s per-parameter state of every memory of ``model`` (call after one grows or its
    slots move)."""
    from .integration import memories

    if not isinstance(model, nn.Module):  # (optimizer, model) swapped: "'SGD' has no attribute named_modules"
        raise TypeError(f"forget_optimizer_state: model must be an nn.Module with MIRA attached, got "
                        f"{type(model).__name__} (the arguments are (model, optimizer))")
    check_optimizer(optimizer, "forget_optimizer_state")
    found = memories(model)
    if not found:  # the backbone or a submodule passed for the model: nothing would be forgotten
        raise RuntimeError("forget_optimizer_state: the model has no MIRA memories (call mira.attach first)")
    for memory in found:
        memory.forget_optimizer_state(optimizer)
