"""Named tasks: the memory's slots by the name they were written under.

``mira.write_adapters(model, task="sketch")`` names the new slot of every memory; a task may
hold several slots (the paper stores several adapters per task). Every function here acts on
all memories at once and checks everything before it changes anything. Names are saved with
the memories (file format version 2, :mod:`mira.io`); a plain state dict carries none.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .integration import memories, named_memories

__all__ = ["remove_tasks", "select_tasks", "task_slot_weights", "task_slots"]


def _memories(model: nn.Module, what: str):
    named = named_memories(model)
    if not named:
        raise RuntimeError(f"{what}: the model has no MIRA memories (call mira.attach first)")
    return named


def task_slots(model: nn.Module) -> dict[str | None, list[int]]:
    """``{task: slot indices}`` of the model's memories, in slot order (None: unnamed slots).

    Every memory must hold the same names in the same order (as ``write_adapters`` writes
    them); otherwise read ``memory.slot_names`` of each memory.
    """
    named = _memories(model, "task_slots")
    layouts = {m.slot_names for _, m in named}
    if len(layouts) > 1:
        raise ValueError("task_slots: the memories hold different slots (" + "; ".join(
            f"{name}: {m.slot_names}" for name, m in named) + "); read each memory's slot_names")
    slots: dict[str | None, list[int]] = {}
    for i, task in enumerate(layouts.pop()):
        slots.setdefault(task, []).append(i)
    return slots


def _as_tasks(tasks: str | Iterable[str], what: str) -> list[str]:
    if tasks is None:
        raise TypeError(f"{what}: tasks are given by name (a str or a sequence of str), got None")
    try:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    except TypeError:  # an int or a 0-d tensor: list() would say only "not iterable"
        raise TypeError(f"{what}: tasks are given by name (a str or a sequence of str), got {tasks!r}") from None
    if not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"{what}: tasks are given by name (str), got {tasks!r}")
    return tasks


def _check_known(named, tasks: list[str], what: str) -> None:
    for name, memory in named:
        unknown = [t for t in tasks if not memory.slots_named(t)]
        if unknown:
            raise KeyError(f"{what}: {name} has no slot named {unknown}; its slots are {memory.slot_names}")


def remove_tasks(model: nn.Module, tasks: str | Iterable[str]) -> list[int]:
    """Remove every slot of ``tasks`` from every memory.

    Returns:
        The number of slots each memory removed (block order).
    """
    named = _memories(model, "remove_tasks")
    tasks = _as_tasks(tasks, "remove_tasks")
    _check_known(named, tasks, "remove_tasks")
    removed = [len(m._slot_indices(tasks)) for _, m in named]
    for _, memory in named:
        memory.remove(tasks)
    return removed


def select_tasks(model: nn.Module, tasks: str | Iterable[str]) -> list[int]:
    """Keep only the slots of ``tasks`` in every memory (slot order kept; unnamed slots go).
    An empty selection is refused (it would empty every memory: ``clear`` each memory for that).

    Returns:
        The number of slots each memory kept (block order).
    """
    named = _memories(model, "select_tasks")
    tasks = _as_tasks(tasks, "select_tasks")
    if not tasks:
        raise ValueError("select_tasks: no task given, which would remove every slot; to empty the memories call "
                         "memory.clear() on each (mira.memories(model))")
    _check_known(named, tasks, "select_tasks")
    drops = [(m, [i for i, name in enumerate(m.slot_names) if name not in tasks]) for _, m in named]
    for memory, drop in drops:
        if drop:
            memory.remove(drop)
    return [m.num_slots for m in memories(model)]


def task_slot_weights(model: nn.Module, task: str) -> dict[str, torch.Tensor]:
    """Fold weights that serve one task: ``1/k`` on each of its k slots, 0 elsewhere, per memory.

    ``mira.fold(model, mira.task_slot_weights(model, "sketch"))`` deploys the task's adapter as a
    plain backbone (with one slot per task, exactly the adapter as trained). With k > 1 slots the
    fold applies mean(B) @ mean(A) of the task's slots: none of its adapters, nor the mean of their
    updates (the update is bilinear in the weights).
    """
    named = _memories(model, "task_slot_weights")
    if not isinstance(task, str):
        raise TypeError(f"task_slot_weights: a task is given by name (str), got {task!r} (unnamed slots have no "
                        "task: fold them with explicit weights)")
    _check_known(named, [task], "task_slot_weights")
    weights = {}
    for name, memory in named:
        slots = memory.slots_named(task)
        w = torch.zeros(memory.num_slots, dtype=torch.float64)
        w[slots] = 1.0 / len(slots)
        weights[name] = w
    return weights
