"""Data-parallel MIRA training with ``torch.distributed``: DDP or FSDP2, launched by ``torchrun``.

Every rank trains the same MIRA parts (an adapter in adaptation; keys, query modules and head in
consolidation) on its share of each global batch, so K ranks compute what one process computes
on that global batch, to the rounding of a different summation order (see the docs)::

    import mira, mira.distributed as md
    ctx = md.init_distributed()                    # from torchrun's environment; one process without it
    model = md.DistributedModel(model, "ddp", grad_reduction="sum")     # or "fsdp"
    for batch in md.ShardedBatches(torch.randperm(n, generator=shared_gen), 32, context=ctx):
        per_sample = F.cross_entropy(model(x[batch.indices]), y[batch.indices], reduction="none")
        batch.loss(per_sample).backward()          # sum of this rank's share / global batch size
        opt.step(); opt.zero_grad()
    mira.write_adapters(model.module)              # grows the memory: the next call rebuilds what DDP needs

What this module owns:

* :func:`init_distributed`: the process group from ``torchrun``'s environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with a timeout, so a rank that
  dies or hangs makes the others fail within the timeout with an error instead of waiting forever.
  Without that environment it returns a one-process context and every helper here is a no-op.
* :class:`ShardedBatches`: rank r computes positions r, r + K, r + 2K, ... of every global batch
  (``DistributedSampler``'s split, applied per global batch) from one permutation drawn from a
  generator every rank holds in the same state. Unlike ``DistributedSampler`` nothing is padded
  or dropped: a global batch that does not divide by K gives shares of unequal size, and the loss
  of each share is divided by the global batch size, with gradients summed over ranks. A rank whose
  share is empty (a tail batch smaller than K) computes one padding sample with weight 0, so that it
  still takes part in the gradient reduction.
* :class:`DistributedModel`: DDP (``forward_sync_buffers=False``: the adapter banks are buffers and
  are not resent every step) or FSDP2 (``fully_shard`` on every transformer block, sharding the
  frozen backbone weights; MIRA's tensors and every trainable parameter stay replicated and their
  gradients are reduced by this module in one flat all-reduce at the end of backward). Before each
  forward it compares the model's layout (shapes and ``requires_grad`` of every parameter and
  buffer) with the one it was built for; when a memory grew or shrank, or the stage changed what
  trains, it rebuilds what the strategy needs and says so on rank 0 (see :class:`DistributedModel`).
* collectives that keep decisions identical on every rank (:func:`all_reduce_sum`,
  :func:`all_gather_rows`, :func:`broadcast_tensors_`, :func:`broadcast_object`), and
  :func:`save_checkpoint` / :func:`load_checkpoint` (one safetensors file written by rank 0 and
  broadcast from rank 0 on load, so several hosts need no shared file system).

Everything MIRA trains is replicated on every rank under both strategies, so a checkpoint is one
rank's copy, and a run can resume on another number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import numbers
import operator
import os
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STRATEGIES",
    "DistributedContext",
    "DistributedModel",
    "Shard",
    "ShardedBatches",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "explain_collective_failures",
    "broadcast_object",
    "broadcast_tensors_",
    "get_context",
    "init_distributed",
    "load_checkpoint",
    "mira_state_tensors",
    "save_checkpoint",
    "shutdown",
]

#: Strategies of :class:`DistributedModel`.
STRATEGIES = ("ddp", "fsdp")
#: Seconds a collective (and the rendezvous) may wait for the other ranks before failing. A rank
#: that dies closes its sockets, so the others usually fail at once; the timeout bounds the wait
#: for a rank that hangs.
DEFAULT_TIMEOUT_S = 300.0

_CHECKPOINT_FORMAT = "mira-distributed-checkpoint"
_CHECKPOINT_VERSION = 1
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


# ----------------------------------------------------------------------------------------------
# Process group.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size``, and the backend (None: one process,
    no process group, every collective here a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        # Built by hand (tests, a custom launcher), a rank outside 0..world_size-1 made ShardedBatches
        # take positions of no rank or another rank's: samples silently dropped and duplicated.
        for name in ("rank", "world_size", "local_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1 with world_size >= 1, got rank {self.rank} "
                             f"of world_size {self.world_size}")

    @property
    def active(self) -> bool:
        """True when a process group exists (even of size 1, as under ``torchrun --nproc-per-node 1``)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device collectives use: this rank's GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


_initialised_here = False


def get_context() -> DistributedContext:
    """The context of the current process group (a one-process context when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    rank = dist.get_rank()
    return DistributedContext(rank=rank, world_size=dist.get_world_size(),
                              local_rank=int(os.environ.get("LOCAL_RANK", rank)), backend=dist.get_backend())


def init_distributed(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, or run as one process.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default NCCL when CUDA is available, else gloo.
        timeout_s: how long the rendezvous and every collective wait for the other ranks.

    Returns:
        The :class:`DistributedContext`. Without ``RANK`` and ``WORLD_SIZE`` in the environment (a
        plain ``python`` launch) no process group is made and the context is rank 0 of 1; one of
        them without the other is refused (ValueError). An existing process group is used as it is.
    """
    global _initialised_here
    # The arguments are checked first, in every launch: a script tried with a plain python launch
    # (where nothing else happens) must not first fail once started under torchrun.
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise TypeError(f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    try:  # inf and huge values overflow the timedelta the process group takes
        timeout = datetime.timedelta(seconds=float(timeout_s))  # numpy scalars too
    except OverflowError:
        raise ValueError(f"timeout_s must be a finite number of seconds (at most "
                         f"{datetime.timedelta.max.total_seconds():.0f}), got {timeout_s!r}") from None
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        return get_context()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if len(missing) == len(_TORCHRUN_VARS):
        return DistributedContext()
    if missing:  # one without the other ran silently as rank 0 of 1: every "rank" trained alone
        present = next(v for v in _TORCHRUN_VARS if v not in missing)
        raise ValueError(f"{present} is set but {missing[0]} is not: a torchrun launch sets both (RANK and "
                         "WORLD_SIZE); set both, or neither for one process")
    if not dist.is_available():
        raise RuntimeError("RANK and WORLD_SIZE are set (a torchrun launch) but this torch build has no "
                           "torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    _initialised_here = True
    return get_context()


def shutdown() -> None:
    """Destroy the process group if :func:`init_distributed` made it (others' groups are left alone)."""
    global _initialised_here
    if _initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    _initialised_here = False


def _ctx(context: DistributedContext | None) -> DistributedContext:
    return get_context() if context is None else context


def _is_collective_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection closed by peer",
                                                                   "Connection reset by peer", "Timed out"))


@contextlib.contextmanager
def explain_collective_failures(context: DistributedContext | None = None, timeout_s: float | None = None):
    """Re-raise a failed collective (a rank died, or did not answer within the timeout) as an
    error that says so, naming this rank; other errors pass unchanged."""
    ctx = _ctx(context)
    try:
        yield
    except Exception as err:
        if not (ctx.active and ctx.world_size > 1 and _is_collective_failure(err)):
            raise
        wait = f" within the {timeout_s:.0f} s timeout" if timeout_s is not None else ""
        raise RuntimeError(
            f"mira.distributed: rank {ctx.rank} of {ctx.world_size} stopped because a collective failed: another "
            f"rank died or did not answer{wait} (see that rank's log for the cause; if no rank failed, the ranks "
            "ran different collectives: e.g. one rank wrote adapters, grew a memory or switched stages and another "
            "did not, which every rank must do identically). The backend said: "
            f"{str(err).splitlines()[0]}") from err


# ----------------------------------------------------------------------------------------------
# Collectives that keep control flow identical on every rank.
# ----------------------------------------------------------------------------------------------


def barrier(context: DistributedContext | None = None) -> None:
    ctx = _ctx(context)
    if ctx.active:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], context: DistributedContext | None = None) -> list[float]:
    """Sums of ``values`` over ranks, in float64 (integer counts below 2^53 stay exact), on every rank.

    Use it for anything a decision depends on (correct counts for early stopping, loss sums): every
    rank then decides from the same numbers.
    """
    ctx = _ctx(context)
    if not ctx.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0, context: DistributedContext | None = None):
    """``obj`` of rank ``src``, on every rank (pickled: for small control data)."""
    ctx = _ctx(context)
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device)
    return box[0]


@torch.no_grad()
def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0,
                       context: DistributedContext | None = None) -> None:
    """In place: every tensor takes rank ``src``'s values (shapes must agree; one flat broadcast per dtype)."""
    ctx = _ctx(context)
    if not ctx.active:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(ctx.device) for t in group])
        dist.broadcast(flat, src=src)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def all_gather_rows(t: torch.Tensor, context: DistributedContext | None = None) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor along dim 0, in rank order, on every rank (n_r may differ)."""
    ctx = _ctx(context)
    if not ctx.active or ctx.world_size == 1:
        return t
    local = t.detach().to(ctx.device)
    counts = torch.tensor([local.shape[0]], dtype=torch.int64, device=ctx.device)
    all_counts = [torch.zeros_like(counts) for _ in range(ctx.world_size)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


# ----------------------------------------------------------------------------------------------
# Sharding each global batch.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Shard:
    """This rank's share of one global batch.

    Attributes:
        indices: (n,) dataset indices this rank computes, n >= 1.
        real: how many of ``indices`` are this rank's share (``n`` or 0: a rank with an empty share
            computes one padding sample with weight 0, so it still takes part in the reduction).
        global_indices: (G,) the whole global batch, in the order one process would see it.
        position: (n,) positions of ``indices`` inside ``global_indices`` (for per-sample draws that
            must be made on the global batch, such as mixup partners).
    """

    indices: torch.Tensor
    real: int
    global_indices: torch.Tensor
    position: torch.Tensor

    @property
    def global_size(self) -> int:
        return int(self.global_indices.numel())

    @property
    def weights(self) -> torch.Tensor:
        """(n,) 1 for this rank's samples, 0 for padding."""
        w = torch.zeros(self.indices.numel())
        w[: self.real] = 1.0
        return w

    def loss(self, per_sample: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global batch's mean: sum of its per-sample losses / global batch size.

        With gradients summed over ranks (``grad_reduction="sum"``) the result is the gradient of
        the global batch's mean loss. Padding contributes exactly zero, whatever its loss.
        """
        if not isinstance(per_sample, torch.Tensor):
            raise TypeError(f"per_sample must be a tensor of per-sample losses, got {type(per_sample).__name__}")
        # Exactly (n,): an (n, k) tensor of per-element losses (reduction="none" on a loss that is
        # not per sample) would be summed over k as well, k times the mean one process computes.
        if per_sample.shape != self.indices.shape:
            raise ValueError(f"per_sample must have one loss per index, shape ({self.indices.numel()},), "
                             f"got shape {tuple(per_sample.shape)}")
        if self.real == self.indices.numel():
            return per_sample.sum() / self.global_size
        # Only the real entries are summed (real is 0 here): weighting the padding by 0 made 0 * inf
        # a NaN that the global batch's loss does not have. Its gradient is still exactly zero.
        return per_sample[: self.real].sum() / self.global_size


class ShardedBatches:
    """This rank's share of every global batch of one epoch, resumable at any batch.

    Args:
        order: (n,) the epoch's sample order (e.g. ``torch.randperm(n, generator=g)`` with a
            generator in the same state on every rank), identical on every rank.
        batch_size: the global batch size G (what one process would use).
        context: rank and world size (default: the current process group).

    Iterating yields one :class:`Shard` per global batch, ``ceil(n / G)`` of them on every rank.
    :meth:`state_dict` records the order and the next batch, so a resumed run continues with the
    same batches.
    """

    def __init__(self, order: torch.Tensor, batch_size: int, *, context: DistributedContext | None = None,
                 position: int = 0) -> None:
        if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype != torch.int64:
            got = (f"a {order.dim()}-D {order.dtype} tensor" if isinstance(order, torch.Tensor)
                   else type(order).__name__)
            raise TypeError(f"order must be a 1-D int64 tensor of sample indices, got {got}")
        # A negative index would pick a sample counted from the end of the data: silently another
        # sample than the one meant, and that sample twice in the epoch.
        if order.numel() and int(order.min()) < 0:
            raise ValueError(f"order must hold sample indices >= 0, got {int(order.min())}")
        # Any integer (a numpy int from a config, as position takes), stored as a plain int.
        try:
            size = None if isinstance(batch_size, bool) else operator.index(batch_size)
        except TypeError:
            size = None
        if size is None or size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(position, bool) or not isinstance(position, numbers.Integral):  # 1.5 failed at the first step
            raise TypeError(f"position must be an int (the next batch), got {type(position).__name__}")
        ctx = _ctx(context)
        self.order = order
        self.batch_size = size
        self.rank, self.world_size = ctx.rank, ctx.world_size
        if not 0 <= position <= len(self):
            raise ValueError(f"position {position} out of range for {len(self)} batches")
        self.position = int(position)

    def __len__(self) -> int:
        return -(-self.order.numel() // self.batch_size)

    def shard(self, i: int) -> Shard:
        """The share of global batch ``i``."""
        # A batch past the end was an empty slice, whose "padding sample" raised an IndexError about
        # an empty tensor; i = -2 sliced order[-4:-2], silently a batch that is none of the epoch's.
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"batch index must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range for {len(self)} batches")
        start = int(i) * self.batch_size
        global_idx = self.order[start : start + self.batch_size]
        # A global batch of fewer samples than the rank (a small tail on many ranks) leaves this
        # rank nothing; arange(rank, n) with rank > n raised instead of returning no positions.
        pos = torch.arange(min(self.rank, global_idx.numel()), global_idx.numel(), self.world_size)
        real = pos.numel()
        if real == 0:
            pos = torch.zeros(1, dtype=torch.int64)
        return Shard(indices=global_idx[pos], real=real, global_indices=global_idx, position=pos)

    def __iter__(self) -> Iterator[Shard]:
        while self.position < len(self):
            shard = self.shard(self.position)
            self.position += 1
            yield shard

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "batch_size": self.batch_size, "position": self.position}

    @classmethod
    def from_state_dict(cls, state: dict, *, context: DistributedContext | None = None) -> ShardedBatches:
        return cls(state["order"], int(state["batch_size"]), context=context, position=int(state["position"]))


# ----------------------------------------------------------------------------------------------
# The wrapped model.
# ----------------------------------------------------------------------------------------------


def mira_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor MIRA owns in ``model``: each memory's keys, banks, mask and query module, and
    each projection's live LoRA, by qualified name (the tensors themselves, not copies)."""
    from .integration import named_memories, projections

    out: dict[str, torch.Tensor] = {}
    for name, mem in named_memories(model):
        for key, t in mem.state_dict(keep_vars=True).items():
            out[f"{name}.{key}" if name else key] = t
    names = {id(m): n for n, m in model.named_modules()}
    for proj in projections(model):
        prefix = names[id(proj)]
        out[f"{prefix}.lora_a"] = proj.lora_a
        out[f"{prefix}.lora_b"] = proj.lora_b
    return out


def _layout(module: nn.Module) -> tuple:
    """What a strategy is built for: name, shape, dtype and requires_grad of every parameter, and
    name and shape of every buffer; each memory's mutation count and each projection's count of
    LoRA resets. A memory that grows, or a stage switch, changes it; so does a write into a memory
    of fixed capacity, which changes no shape, and a fresh live LoRA (``reset_lora``, which
    ``write_adapters`` calls): after those rank 0's contents must be broadcast as after a growth
    (else the ranks' models silently differ: each rank draws its own keys and LoRA A)."""
    from .layers import MiraProjection
    from .memory import AdapterMemory

    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape)) for n, b in module.named_buffers())
    writes = tuple((n, m._mutations) for n, m in module.named_modules() if isinstance(m, AdapterMemory))
    resets = tuple((n, m._lora_resets) for n, m in module.named_modules() if isinstance(m, MiraProjection))
    return params, buffers, writes, resets


def _describe_change(old: tuple, new: tuple) -> str:
    old_p = {n: (s, g) for n, s, _, g in old[0]}
    new_p = {n: (s, g) for n, s, _, g in new[0]}
    old_b, new_b = dict(old[1]), dict(new[1])
    grown = [f"{n} {old_p[n][0]} -> {s}" for n, (s, _) in new_p.items() if n in old_p and old_p[n][0] != s]
    grown += [f"{n} {old_b[n]} -> {s}" for n, s in new_b.items() if n in old_b and old_b[n] != s]
    trainable = [n for n, (_, g) in new_p.items() if n in old_p and old_p[n][1] != g]
    added = [n for n in list(new_p) + list(new_b) if n not in old_p and n not in old_b]
    removed = [n for n in list(old_p) + list(old_b) if n not in new_p and n not in new_b]
    parts = []
    if grown:
        parts.append(f"{len(grown)} tensors changed shape (e.g. {grown[0]})")
    if trainable:
        parts.append(f"{len(trainable)} parameters changed requires_grad (e.g. {trainable[0]})")
    if added or removed:
        parts.append(f"{len(added)} tensors added, {len(removed)} removed")
    old_writes = dict(old[2])
    written = [n for n, count in new[2] if old_writes.get(n) != count]
    if written and not grown:
        parts.append(f"{len(written)} memories written in place (e.g. {written[0] or 'the memory'})")
    old_resets = dict(old[3])
    reset = [n for n, count in new[3] if old_resets.get(n) != count]
    if reset and not written:
        parts.append(f"the live LoRA of {len(reset)} projections reset (e.g. {reset[0] or 'the projection'})")
    return "; ".join(parts) or "no change"


def _fresh_grad_accumulator(p: torch.Tensor) -> None:
    # Autograd caches one AccumulateGrad node per leaf, with the leaf's shape at creation; a
    # growing memory swaps ``keys.data`` for a larger tensor, and if anything (a DDP reducer, a
    # live graph) still holds the old node, the next backward fails with "invalid gradient ...
    # got [N+1, d] but expected [N, d]". Setting data of another dtype makes autograd drop the
    # cached node; the next forward then creates one of the right shape.
    data = p.data
    p.data = torch.empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32,
                         device=data.device)
    p.data = data


# The wrapper that reduces a module's replicated gradients (FSDP strategy): the newest one. A
# wrapper the caller dropped may live on in reference cycles, and its hooks must not reduce too.
_ACTIVE_WRAPPER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reduce_hook(ref: weakref.ref):
    def hook(_param: torch.Tensor) -> None:
        wrapper = ref()
        if wrapper is not None and _ACTIVE_WRAPPER.get(wrapper.module) is ref:
            wrapper._queue_reduce()

    return hook


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _transformer_blocks(module: nn.Module) -> list[nn.Module]:
    from .integration import _qkv_blocks

    return [block for _, block in _qkv_blocks(module)]


class DistributedModel:
    """A model trained data-parallel with DDP or FSDP2, rebuilt when its layout changes.

    Args:
        module: the model (MIRA attached). Call the :class:`DistributedModel` to run it; mutate and
            evaluate ``.module`` (``write_adapters``, ``set_stage``, inference) as usual. A mutation
            reaches the other ranks at the wrapper's next call, which broadcasts rank 0's MIRA tensors:
            until then each rank holds what it drew (``write_adapters`` and ``reset_lora`` draw keys
            and LoRA A from each rank's random state), so evaluate ``.module`` after a call, or pass
            them a ``generator`` seeded alike on every rank.
        strategy: ``"ddp"`` or ``"fsdp"`` (see below). Ignored, with nothing wrapped, in one process.
        grad_reduction: ``"mean"`` (DDP's convention: each rank's loss is the mean of its share,
            exact when shares are equal) or ``"sum"`` (each rank's loss is its share's sum divided
            by the global batch size, :meth:`Shard.loss`: exact for shares of any size).
        context: the process group's context (default: the current one).
        bucket_cap_mb: DDP's gradient bucket size.
        verbose: print what is (re)built, on rank 0.

    Strategies:

    * ``"ddp"``: ``DistributedDataParallel`` over the whole module, ``forward_sync_buffers=False``,
      gradients all-reduced in buckets during backward. Built on the first call (its init sync
      broadcasts rank 0's parameters and buffers and checks every rank has the same shapes). It
      must be rebuilt when the layout changes: a grown memory leaves its reducer with buckets of
      the old shapes (the backward then fails with "invalid gradient ... got [3, d] but expected
      [2, d]"), and a stage switch leaves it reducing the previous stage's parameters only (the
      new ones would train apart on every rank). A rebuild drops the old reducer, checks that every
      rank has the same layout, broadcasts rank 0's MIRA tensors and trainable parameters (not the
      frozen backbone) and builds a new reducer: one small broadcast per rebuild. A stage that
      trains nothing (inference) gets no DDP (it refuses such a module) but the same broadcasts:
      of every parameter and buffer at the first call, of MIRA's tensors at a rebuild.
    * ``"fsdp"``: ``fully_shard`` on every transformer block, once, at the first call. It shards
      the frozen backbone weights (each rank keeps 1/K, all-gathered block by block in forward and
      backward); MIRA's tensors (keys, banks, query modules, LoRAs) and every parameter that
      trains at that point (the head) are left out of the sharding (``ignored_params``), stay
      replicated, and their gradients are all-reduced here in one flat buffer at the end of each
      backward. Growth and stage switches therefore cost no re-sharding; a rebuild only re-lists
      the replicated parameters and broadcasts rank 0's copies. A frozen backbone parameter that
      later becomes trainable is refused (it is sharded): unfreeze it before the first call.

    The backbone stays frozen under both (as ``mira.set_stage`` leaves it). Every rank must make
    the same calls in the same order (the same global batches, the same ``write_adapters``).
    """

    def __init__(self, module: nn.Module, strategy: str = "ddp", *, grad_reduction: str = "mean",
                 context: DistributedContext | None = None, bucket_cap_mb: float | None = None,
                 verbose: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
        # Checked here, not by DDP at the first forward: that comes after the ranks' layout exchange,
        # and "25" raised about a 2-million-digit integer, nan about converting NaN.
        if bucket_cap_mb is not None:
            if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real):
                raise TypeError(f"bucket_cap_mb must be a number of megabytes or None, got "
                                f"{type(bucket_cap_mb).__name__}")
            if not 0 <= bucket_cap_mb < float("inf"):
                raise ValueError(f"bucket_cap_mb must be finite and >= 0, got {bucket_cap_mb!r}")
        self.module = module
        self.strategy = strategy
        self.grad_reduction = grad_reduction
        self.context = _ctx(context)
        self.bucket_cap_mb = bucket_cap_mb
        self.verbose = verbose
        self.builds = 0  # how many times the strategy was (re)built: 1 + rebuilds
        self._layout: tuple | None = None
        self._ddp: nn.Module | None = None
        self._replicated: list[nn.Parameter] = []
        self._hooks: list = []
        self._reduce_queued = False
        self._ref = weakref.ref(self)
        _ACTIVE_WRAPPER[module] = self._ref
        weakref.finalize(self, _remove_handles, self._hooks)

    @property
    def wrapped(self) -> nn.Module:
        """What the forward calls: the DDP module, or ``module`` itself (FSDP shards it in place)."""
        return self._ddp if self._ddp is not None else self.module

    def __call__(self, *args, **kwargs):
        if self.context.active:
            self._ensure_current()
        return self.wrapped(*args, **kwargs)

    # -- (re)building ----------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if self.verbose and self.context.is_main:
            print(f"mira.distributed: {message}", flush=True)

    def _ensure_current(self) -> None:
        layout = _layout(self.module)
        if layout == self._layout:
            return
        first = self._layout is None
        if not first:
            self._log(f"rebuilding {self.strategy.upper()} ({_describe_change(self._layout, layout)})")
            self._teardown(layout)
        self._check_same_layout(layout)
        if self.strategy == "ddp":
            self._build_ddp(first)
        else:
            self._build_fsdp(first)
        self._layout = layout
        self.builds += 1
        if first:
            self._log(f"{self.strategy.upper()} over {self.context.world_size} ranks "
                      f"({self.context.backend}), gradients {'summed' if self.grad_reduction == 'sum' else 'averaged'}")

    def _teardown(self, new_layout: tuple) -> None:
        self._ddp = None  # drops the reducer and its hooks on the old gradient accumulators
        _remove_handles(self._hooks)
        gc.collect()
        old_shapes = {n: s for n, s, _, _ in self._layout[0]}
        for name, p in self.module.named_parameters():
            if name in old_shapes and old_shapes[name] != tuple(p.shape):
                _fresh_grad_accumulator(p)

    def _check_same_layout(self, layout: tuple) -> None:
        if self.context.world_size == 1:
            return
        mine = [(n, s, str(d), g) for n, s, d, g in layout[0]], list(layout[1]) + list(layout[2]) + list(layout[3])
        every = [None] * self.context.world_size
        dist.all_gather_object(every, mine)
        for r, theirs in enumerate(every):
            if theirs != mine:
                a = {e[0]: e[1:] for e in mine[0]} | {e[0]: e[1:] for e in mine[1]}
                b = {e[0]: e[1:] for e in theirs[0]} | {e[0]: e[1:] for e in theirs[1]}
                diff = sorted(set(a.items()) ^ set(b.items()))
                raise RuntimeError(
                    f"mira.distributed: rank {r}'s model differs from rank {self.context.rank}'s "
                    f"(e.g. {diff[:2]}): every rank must attach, grow (write_adapters) and switch stages "
                    "identically (and reset_lora alike)")

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _build_ddp(self, first: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        trainable = self._trainable()
        if not first:
            self._broadcast_mira_and_trainable()
        elif not trainable:
            # What DDP's init sync would do: the ranks start from rank 0's parameters and buffers.
            broadcast_tensors_([*self.module.parameters(), *self.module.buffers()], context=self.context)
        if not trainable:
            # Nothing trains (inference): DDP refuses such a module, and needs none. The broadcast
            # above still runs: ranks that wrote different keys would otherwise serve different models.
            self._ddp = None
            return
        device_ids = [self.context.local_rank] if self.context.backend == "nccl" else None
        self._ddp = DDP(self.module, device_ids=device_ids, forward_sync_buffers=False, init_sync=first,
                        bucket_cap_mb=self.bucket_cap_mb)
        if self.grad_reduction == "sum":
            self._ddp.register_comm_hook(None, _allreduce_sum_hook)

    def _build_fsdp(self, first: bool) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor

        if first:
            # Refused before the broadcast: a failed call must not have replaced the ranks' weights
            # (every rank has the same layout, checked above, so every rank refuses).
            blocks = _transformer_blocks(self.module)
            if not blocks:
                raise ValueError("strategy='fsdp' shards transformer blocks (modules with attn.qkv); found none")
            replicated = set(mira_state_tensors(self.module).values()) | set(self._trainable())
            replicated = {p for p in replicated if isinstance(p, nn.Parameter)}
            plain = [t for t in (*self.module.parameters(), *self.module.buffers()) if not isinstance(t, DTensor)]
            broadcast_tensors_(plain, context=self.context)
            for block in blocks:
                if not isinstance(block, FSDPModule):  # a model wrapped before keeps its sharding
                    fully_shard(block, ignored_params=replicated)
        else:
            self._broadcast_mira_and_trainable()
        sharded_trainable = [n for n, p in self.module.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
        if sharded_trainable:
            raise RuntimeError(
                f"strategy='fsdp' shards only frozen backbone parameters, but {sharded_trainable[0]} (sharded) now "
                "requires grad: make it trainable before the first forward, or use strategy='ddp'")
        self._replicated = [p for p in self._trainable() if not isinstance(p, DTensor)]
        self._hooks.extend(p.register_post_accumulate_grad_hook(_reduce_hook(self._ref)) for p in self._replicated)

    @torch.no_grad()
    def _broadcast_mira_and_trainable(self) -> None:
        from torch.distributed.tensor import DTensor

        tensors = {id(t): t for t in mira_state_tensors(self.module).values()}
        tensors |= {id(p): p for p in self._trainable()}
        broadcast_tensors_([t for t in tensors.values() if not isinstance(t, DTensor)], context=self.context)

    # -- FSDP: the replicated parameters' gradients ------------------------------------------------

    def _queue_reduce(self) -> None:
        if not self._reduce_queued:
            self._reduce_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_replicated)

    @torch.no_grad()
    def _reduce_replicated(self) -> None:
        # One flat all-reduce per dtype, in the same parameter order on every rank. A leading
        # "has a gradient" flag per parameter keeps single-process semantics: a parameter no rank
        # computed a gradient for keeps grad None (AdamW then skips it).
        self._reduce_queued = False
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self._replicated:
            by_dtype.setdefault(p.dtype, []).append(p)
        for params in by_dtype.values():
            device = params[0].device
            flags = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=device)
            grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
            flat = torch.cat([flags, *grads])
            dist.all_reduce(flat)
            if self.grad_reduction == "mean":
                flat[len(params):] /= self.context.world_size
            parts = flat[len(params):].split([p.numel() for p in params])
            for p, had, g in zip(params, flat[: len(params)].tolist(), parts):
                if had > 0:
                    p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def _allreduce_sum_hook(process_group, bucket):
    # DDP's default hook divides by the world size (each rank's loss a mean over an equal share);
    # with shares of unequal size each rank's loss is already its part of the global mean.
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# ----------------------------------------------------------------------------------------------
# Checkpoints: one rank's copy of the replicated state.
# ----------------------------------------------------------------------------------------------


def _flatten(obj, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(obj, torch.Tensor):
        # Named by its number, then its path (for reading the file): the path alone collides when
        # keys spell the same path ("a/b" and a -> b; 1 and "1"), and one tensor silently replaced
        # the other. The tree records each tensor's name, so files of path-named tensors still load.
        key = f"{len(tensors)}{path}"  # the path is empty or starts with "/": the number ends there
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int (at {path or 'the root'})")
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path or 'the root'}: use tensors, numbers, "
                    "strings, lists and dicts")


def _unflatten(node, tensors: dict[str, torch.Tensor]):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        items = [_unflatten(v, tensors) for v in node["__list__"]]
        return tuple(items) if node["tuple"] else items
    return node


def save_checkpoint(path: str | os.PathLike, state: dict, context: DistributedContext | None = None) -> None:
    """Rank 0 writes ``state`` (nested dicts / lists of tensors, numbers, strings) to ``path`` atomically.

    One safetensors file: tensors by their number and path in ``state`` (``"3/model/keys"``), the
    structure and the other values as JSON in its metadata. The previous file stays intact until
    the new one is complete (write, then rename). Every rank must call it (it ends with a barrier);
    only rank 0's copy is written, which is every rank's copy of the replicated state.
    """
    from safetensors.torch import save_file

    ctx = _ctx(context)
    if ctx.is_main:
        tensors: dict[str, torch.Tensor] = {}
        tree = _flatten(state, tensors, "")
        meta = {"format": _CHECKPOINT_FORMAT, "version": str(_CHECKPOINT_VERSION), "tree": json.dumps(tree),
                "world_size": str(ctx.world_size)}
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    barrier(ctx)


def load_checkpoint(path: str | os.PathLike, context: DistributedContext | None = None) -> dict | None:
    """The state :func:`save_checkpoint` wrote, on every rank (rank 0 reads, then broadcasts it).

    Returns None when rank 0 finds no file at ``path``. A file of another format or version is
    refused with an error on every rank.
    """
    from safetensors import safe_open

    ctx = _ctx(context)
    result: dict | None | str = None
    if ctx.is_main:
        path = os.fspath(path)
        if os.path.exists(path):
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != _CHECKPOINT_FORMAT:
                        raise ValueError(f"{path} is not a mira.distributed checkpoint")
                    if meta.get("version") != str(_CHECKPOINT_VERSION):
                        raise ValueError(f"{path} has checkpoint version {meta.get('version')}; this package "
                                         f"reads version {_CHECKPOINT_VERSION}")
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
                result = _unflatten(json.loads(meta["tree"]), tensors)
            except Exception as err:  # every rank must learn of it, not only rank 0
                result = f"cannot load checkpoint {path}: {err}"
    result = broadcast_object(result, context=ctx)
    if isinstance(result, str):
        raise ValueError(result)
    return result
