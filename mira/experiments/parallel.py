"""The recipe's data-parallel parts: what fills :mod:`.training`'s seams under ``torchrun``.

Every function here is what the two stages (:mod:`.stages`) call; in one process (no process
group) each reduces to the plain single-process code path, bit for bit, so one process and K
ranks run the same code. Under ``torchrun`` (see :mod:`mira.distributed`):

* batches (the sampler seam): :class:`GlobalBatchSampler` draws each epoch's permutation from
  ``(seed, epoch)`` exactly as :class:`.training.EpochSampler` does; rank r computes positions
  r, r + K, ... of each global batch of ``RecipeConfig.batch_size`` (the global batch is what one
  process uses: K ranks take the same optimiser steps as one process);
* the step: the model runs under DDP or FSDP2 (:func:`set_strategy`); each rank's loss is its
  share's sum over the global batch size and gradients are summed over ranks, so the gradient is
  the global batch's mean gradient whatever the share sizes;
* decisions (the reduce seam): early stopping on training accuracy and the loss the run reports
  come from :class:`.training.StepStats` summed over ranks (:func:`reduce_stats`); per-sample
  draws (mixup partners and weights) are made for the whole global batch on every rank from the
  shared generators;
* DualGPM: each rank computes the activations of its share, the rows are gathered in the global
  batch's order, rank 0 grows the bases and broadcasts them, so they are bitwise equal everywhere;
* evaluation: each rank scores its share of every evaluation batch, the correct counts are summed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mira import distributed as md

from .dualgpm import GradientProjectionMemory
from .training import EpochSampler, StepStats

__all__ = [
    "GlobalBatchSampler",
    "batch_loss",
    "eval_batches",
    "gather_global_rows",
    "get_strategy",
    "set_strategy",
    "reduce_stats",
    "share_gpm_",
    "sum_over_ranks",
    "sync_global_rng_",
    "wrap",
]

_strategy = "ddp"


def set_strategy(strategy: str) -> None:
    """``"ddp"`` (default) or ``"fsdp"``: how the stages wrap the model when a process group exists."""
    global _strategy
    if strategy not in md.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {md.STRATEGIES}")
    _strategy = strategy


def get_strategy() -> str:
    return _strategy


def wrap(module: nn.Module) -> nn.Module | md.DistributedModel:
    """What a training step calls: ``module`` under the chosen strategy (gradients summed over
    ranks), or ``module`` itself in one process."""
    ctx = md.get_context()
    if not ctx.active:
        return module
    return md.DistributedModel(module, _strategy, grad_reduction="sum", context=ctx, verbose=False)


class GlobalBatchSampler(EpochSampler):
    """:class:`.training.EpochSampler`'s epochs, dealt as this rank's share of each global batch.

    Args:
        n, seed, shuffle: as :class:`.training.EpochSampler` (the same permutation per epoch).
        batch_size: the *global* batch size (what one process uses).

    Iterating yields one :class:`mira.distributed.Shard` per global batch, ``ceil(n / batch_size)``
    of them on every rank (a rank whose share of a tail batch is empty computes one padding sample
    of weight 0, so every rank takes every step). In one process each shard is the whole batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, shuffle: bool = True) -> None:
        ctx = md.get_context()
        super().__init__(n, batch_size, seed, shuffle=shuffle)
        self.rank, self.world_size = ctx.rank, ctx.world_size  # kept for reference; sharding is per batch

    def __iter__(self):
        return iter(md.ShardedBatches(self.order(), self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def batch_loss(logits: torch.Tensor, y: torch.Tensor, shard: md.Shard) -> tuple[torch.Tensor, StepStats]:
    """Cross-entropy of this rank's share and its counts (padding excluded).

    The loss is the share's part of the global batch's mean (its sum over the global batch size),
    so gradients summed over ranks are the global batch's mean gradient. When the share is the
    whole batch (one process) it is ``F.cross_entropy(logits, y)`` itself, as before this module.
    """
    real = shard.real
    if real == shard.global_size:
        loss = F.cross_entropy(logits, y)
        loss_sum = loss.item() * real
    else:
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = shard.loss(per_sample)
        loss_sum = per_sample[:real].sum().item()
    correct = (logits.argmax(-1)[:real] == y[:real]).sum().item()
    return loss, StepStats(loss_sum, correct, real)


def reduce_stats(stats: StepStats) -> StepStats:
    """An epoch's counts summed over ranks (the reduce seam of :func:`.training.fit`): every rank
    then takes the same early-stop decision from the global batch's numbers."""
    if not md.get_context().active:
        return stats
    loss_sum, correct, seen = md.all_reduce_sum([stats.loss_sum, stats.correct, stats.seen])
    return StepStats(loss_sum, int(correct), int(seen))


def sync_global_rng_() -> None:
    """Every rank's global torch generator takes rank 0's state (draws such as mixup's Beta weights
    use it: ranks that drew differently before would otherwise mix differently)."""
    if md.get_context().active:
        torch.set_rng_state(md.broadcast_object(torch.get_rng_state()))


def eval_batches(n: int, batch_size: int) -> md.ShardedBatches:
    """Evaluation over n samples in order: up to ``batch_size`` per rank per forward, the same
    number of forwards on every rank (FSDP2's all-gathers must match)."""
    return md.ShardedBatches(torch.arange(n), batch_size * md.get_context().world_size)


def sum_over_ranks(values) -> list[float]:
    """Sums over ranks (float64), identical on every rank."""
    return md.all_reduce_sum(values)


def gather_global_rows(rows: torch.Tensor, shard: md.Shard) -> torch.Tensor:
    """Every rank's rows of one global batch, in the global batch's order, on every rank.

    Args:
        rows: (n, ...) rows computed for ``shard.indices`` (padding rows are dropped).
    """
    ctx = md.get_context()
    if not ctx.active or ctx.world_size == 1:
        return rows[: shard.real]
    mine = rows[: shard.real]
    pos = md.all_gather_rows(shard.position[: shard.real].to(torch.int64))
    every = md.all_gather_rows(mine)
    out = every.new_empty((shard.global_size, *every.shape[1:]))
    out[pos] = every
    return out


def share_gpm_(gpm: GradientProjectionMemory) -> None:
    """In place: every rank's bases become rank 0's (bitwise)."""
    if md.get_context().active:
        gpm.load_state_dict(md.broadcast_object(gpm.state_dict()))
