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
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

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

# id -> tensor, weakly (a WeakSet would compare tensors with ==, element-wise).
_resized: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_stepped: weakref.WeakSet = weakref.WeakSet()  # optimisers that have stepped since the hook was registered
# optimiser -> ids of memory tensors whose state in it is from before their slots moved
_stale: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook = None


def watch() -> None:
    """Register the step pre-hook (once per process; every memory calls it when it is made), so that
    every optimiser that steps is known before a memory's slots move."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_state)


def note_resized(*tensors: torch.Tensor) -> None:
    """Record memory tensors whose shape just changed (called by the memory when it resizes)."""
    _resized.update({id(t): t for t in tensors if isinstance(t, nn.Parameter)})
    watch()


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
    state = optimizer.state
    for param in list(_resized.values()):
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
