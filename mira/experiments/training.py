"""The one training loop every stage uses (adaptation, consolidation, the LoRA baselines).

A stage supplies a *step* (one optimiser step on one batch of indices, returning its counts);
this module owns everything around it, each piece a seam a distributed run replaces:

* **data loading**: :class:`EpochSampler` yields the index batches of an epoch, reshuffled from
  ``(seed, epoch)`` like ``torch.utils.data.DistributedSampler`` (``set_epoch``), and already
  takes ``rank`` / ``world_size`` to shard them;
* **the step**: a callable ``step(indices) -> StepStats``, built by the stage;
* **the early-stop decision**: :class:`EarlyStop` decides from an epoch's summed counts, after
  ``reduce`` (identity here; an all-reduce of the counts across ranks in a distributed run,
  so every rank takes the same decision);
* **checkpointable state**: :class:`LoopState` (epochs done, stop flag, per-epoch history) with
  ``state_dict`` / ``load_state_dict``; with the model's and optimiser's state dicts it
  resumes a run where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

__all__ = ["EarlyStop", "EpochSampler", "LoopState", "StepStats", "fit"]


@dataclasses.dataclass
class StepStats:
    """Counts of one step (summed over an epoch, then reduced across ranks)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(self.loss_sum + other.loss_sum, self.correct + other.correct, self.seen + other.seen)

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else float("nan")


class EpochSampler:
    """Index batches of ``range(n)``, reshuffled each epoch from ``(seed, epoch)``.

    Args:
        n: number of samples.
        batch_size: batch size per rank.
        seed: the shuffle of epoch e uses generator seed ``seed * 1_000_003 + e``: any epoch can
            be replayed alone (resuming needs no generator state).
        shuffle: False keeps the order.
        rank, world_size: this rank's share is every ``world_size``-th index of the epoch's
            permutation, starting at ``rank`` (as ``DistributedSampler`` deals them).
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if n < 0 or batch_size < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """(n,) the current epoch's permutation of every index (before sharding)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return torch.randperm(self.n, generator=gen)
        return torch.arange(self.n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.order()[self.rank :: self.world_size]
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]

    def __len__(self) -> int:
        share = len(range(self.rank, self.n, self.world_size))
        return (share + self.batch_size - 1) // self.batch_size


@dataclasses.dataclass
class EarlyStop:
    """The recipe's rule: stop after the first epoch whose running train accuracy exceeds ``above``."""

    above: float = 0.99

    def should_stop(self, epoch_stats: StepStats) -> bool:
        return epoch_stats.seen > 0 and epoch_stats.accuracy > self.above


@dataclasses.dataclass
class LoopState:
    """What a resumed run needs besides the model's and optimiser's state dicts."""

    epochs_done: int = 0
    stopped: bool = False
    history: list = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epochs_done = int(state["epochs_done"])
        self.stopped = bool(state["stopped"])
        self.history = list(state["history"])


def _identity(stats: StepStats) -> StepStats:
    return stats


def fit(step: Callable[[torch.Tensor], StepStats], sampler: EpochSampler, *, epochs: int,
        early_stop: EarlyStop | None = None, reduce: Callable[[StepStats], StepStats] = _identity,
        state: LoopState | None = None, on_epoch_end: Callable[[int, StepStats], None] | None = None) -> LoopState:
    """Run ``step`` over ``sampler``'s batches for up to ``epochs`` epochs.

    Args:
        step: one optimiser step on a batch of indices; returns that batch's counts.
        sampler: the data-loading seam (set_epoch + iteration).
        epochs: maximum number of epochs (counting those already in ``state``).
        early_stop: the decision taken after each epoch on the *reduced* counts.
        reduce: combines an epoch's counts across ranks (identity on one process).
        state: a :class:`LoopState` to resume from (a fresh one by default).
        on_epoch_end: called with (epoch, reduced counts), e.g. for checkpoints or progress.

    Returns:
        The final :class:`LoopState` (history holds each epoch's accuracy and mean loss).
    """
    state = state or LoopState()
    while not state.stopped and state.epochs_done < epochs:
        sampler.set_epoch(state.epochs_done)
        total = StepStats()
        for indices in sampler:
            total = total + step(indices)
        total = reduce(total)
        state.history.append({"train_acc": total.accuracy, "loss": total.mean_loss})
        state.epochs_done += 1
        if early_stop is not None and early_stop.should_stop(total):
            state.stopped = True
        if on_epoch_end is not None:
            on_epoch_end(state.epochs_done - 1, total)
    return state
