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


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()  # a key one identity has and the other has not (a file of an older identity)


def _differences(saved, current, path: str = "") -> list[str]:
    """Where two identities differ, by path (``protocol.gpm``, ``data[1].sha256``), the file's value first."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = list(current) + [k for k in saved if k not in current]
        return [d for k in keys for d in _differences(saved.get(k, _ABSENT), current.get(k, _ABSENT),
                                                      f"{path}.{k}" if path else str(k))]
    if isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            return [f"{path} has {len(saved)} entries in the file, {len(current)} in this run"]
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in _differences(a, b, f"{path}[{i}]")]
    if saved == current:
        return []
    file, this = (r if len(r) <= 40 else r[:36] + "..." for r in (repr(saved), repr(current)))  # digests
    return [f"{path or 'identity'} is {file} in the file, {this} in this run"]


class TaskCheckpoint:
    """One run's checkpoint file, tied to the run it belongs to.

    Args:
        path: the file (its folder is created when saving).
        identity: what the run is (setting, variant, seed, tasks, recipe, protocol settings and
            fingerprints of the data, adapters and backbone: ``protocols._run_identity``; a JSON-able
            dict): a file of another run is refused, naming what differs, instead of silently resumed.
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
            differ = _differences(saved.get("identity"), self.identity)
            raise ValueError(f"checkpoint {self.path} belongs to another run: {'; '.join(differ[:5])}"
                             + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
                             + ": use another path or delete the file")
        return saved["state"]

    def save(self, state: dict) -> None:
        """Every rank calls it; rank 0 writes atomically (the previous file stays until the new one is whole)."""
        md.save_checkpoint(self.path, {"identity": self.identity, "state": state})
