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
moments of another. So every such move counts as a new generation of the memory's tensors, and the
same hook refuses a step whose optimiser holds state of a moved tensor that it did not start
afresh after the move: it remembers, per optimiser, the generation it last saw each such tensor
without state, which a new state (a first step, or one after :func:`forget_optimizer_state`) then
belongs to.
"""

from __future__ import annotations

import itertools
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
_moved: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_generation: dict[int, int] = {}  # id of a tensor in _moved -> the number of its last move
_moves = itertools.count(1)  # numbers every move: unique, so an id reused by a new tensor cannot match
# optimiser -> {id of a moved tensor: the generation it last stepped that tensor without state}
_fresh_since: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook = None


def _register_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_state)


def note_resized(*tensors: torch.Tensor) -> None:
    """Record memory tensors whose shape just changed (called by the memory when it resizes)."""
    _resized.update({id(t): t for t in tensors if isinstance(t, nn.Parameter)})
    _register_hook()


def note_moved(*tensors: torch.Tensor) -> None:
    """Record memory tensors whose slots just moved or were replaced (called by the memory)."""
    for t in tensors:
        if isinstance(t, nn.Parameter):
            _generation[id(t)] = next(_moves)
            _moved[id(t)] = t
    for key in [k for k in _generation if k not in _moved]:  # tensors gone since: their ids may be reused
        del _generation[key]
    _register_hook()


def _check_state(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    _check_shapes(optimizer)
    _check_moves(optimizer)


def _check_moves(optimizer: torch.optim.Optimizer) -> None:
    if not _moved:
        return
    state = optimizer.state
    fresh = _fresh_since.setdefault(optimizer, {})
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for key, param in list(_moved.items()):
        generation = _generation.get(key)
        if generation is None or key not in managed:
            continue
        if param not in state:  # a defaultdict: test, never index. Any state made from here on is new
            fresh[key] = generation
        elif fresh.get(key) != generation:
            raise RuntimeError(
                f"{type(optimizer).__name__}.step: it holds state of a MIRA memory tensor of shape "
                f"{tuple(param.shape)} whose slots have moved or been replaced since that state began (remove, "
                "clear, select_tasks, load_memories): the step would update each slot with the moments of "
                "another. Call mira.forget_optimizer_state(model, optimizer) (or "
                "memory.forget_optimizer_state(optimizer)) after changing a memory, or build a new optimizer; "
                "nothing was updated"
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
