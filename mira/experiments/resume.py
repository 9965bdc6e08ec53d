"""Checkpoints of a continual run at task boundaries, so that a killed run resumes where it was.

:func:`.protocols.run_continual` (``checkpoint=path``) saves, after every task, what the rest of
the run depends on: the trained tensors (:func:`trained_tensors`: every memory's keys, banks and
query module, the live LoRAs, the head), the DualGPM bases, the routing memory, the accuracy
matrix so far, and both random generators (the run's and torch's global one). A run started
again with the same path skips the finished tasks and continues from that state, so it ends
with bitwise the same keys, heads and metrics as a run that was never stopped (a task that was
interrupted restarts from its beginning; the adaptation pool is deterministic and retrained). The
stage and train/eval mode are not saved: they follow from the variant's kind, and run_continual
sets them after every task and after loading alike.

The file is :func:`mira.distributed.save_checkpoint`'s (one safetensors file, written by rank 0,
read by rank 0 and broadcast): under ``torchrun`` every rank resumes from the same state.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from mira import distributed as md

__all__ = ["TaskCheckpoint", "load_trained_tensors", "trained_tensors"]


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of everything the recipe trains or writes in ``model``, by state-dict name: MIRA's
    tensors (:func:`mira.distributed.mira_state_tensors`) and the head."""
    state = {k: v.detach().clone() for k, v in md.mira_state_tensors(model).items()}
    state.update({f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()})
    return state


@torch.no_grad()
def load_trained_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`trained_tensors`' output into a model of the same recipe (memories grow to the
    stored slot count; a head of another shape is replaced by one of the stored shape)."""
    weight = state["head.weight"]
    has_bias = "head.bias" in state
    head = model.head
    if tuple(head.weight.shape) != tuple(weight.shape) or (head.bias is not None) != has_bias:
        model.head = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias).requires_grad_(
            head.weight.requires_grad)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint holds tensors this model does not have: {result.unexpected_keys[:5]}")


class TaskCheckpoint:
    """One run's checkpoint file, tied to the run it belongs to.

    Args:
        path: the file (its folder is created when saving).
        identity: what the run is (setting, variant, seed, tasks, recipe): a file of another run
            is refused instead of silently resumed.
    """

    def __init__(self, path: str | os.PathLike, identity: dict) -> None:
        self.path = os.fspath(path)
        self.identity = identity

    def load(self) -> dict | None:
        """The saved state (on every rank), or None when there is no file yet."""
        try:
            saved = md.load_checkpoint(self.path)
        except ValueError as err:
            if os.path.isdir(self.path):  # said "No such device (os error 19)"
                raise IsADirectoryError(f"checkpoint {self.path} is a folder, not a checkpoint file: "
                                        "remove it or use another path") from err
            raise
        if saved is None:
            return None
        if saved.get("identity") != self.identity:
            raise ValueError(f"checkpoint {self.path} belongs to another run ({saved.get('identity')}); "
                             f"this run is {self.identity}: use another path or delete the file")
        return saved["state"]

    def save(self, state: dict) -> None:
        """Every rank calls it; rank 0 writes atomically (the previous file stays until the new one is whole)."""
        md.save_checkpoint(self.path, {"identity": self.identity, "state": state})
