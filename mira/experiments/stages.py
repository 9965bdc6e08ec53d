"""MIRA's two training stages (method.md section 3) on a timm ViT with MIRA attached.

* :func:`train_adapter_pool`, the **adaptation** stage: for each task and each of ``n`` copies
  (different seeds) a fresh LoRA on Q/V of every block plus a head (a fresh bias-free head, the
  authors; or the backbone's own frozen head, ``adapt_head="shared"``), then
  :func:`mira.write_adapters`. Adapters do not depend on earlier tasks (the backbone is frozen and
  every LoRA starts fresh), so one pool per seed serves every protocol and variant that uses them.
* :func:`consolidate`, the **consolidation** stage: adapters frozen; keys, query modules and
  the head trained with cross-entropy; optional class mask (CIL), within-class mixup (DG),
  DualGPM projection (DIL / CIL) and the routing options of :mod:`.recipe`.

Both run through :func:`.training.fit` (one loop: sampler, step, early-stop decision, state),
with the seams filled by :mod:`.parallel`: under ``torchrun`` every rank computes its share of
each global batch and DDP / FSDP2 sums the gradients, so K ranks take one process's steps.
The model's own ``head`` attribute is the task head, trained through
``mira.set_stage(..., extra_trainable=("head",))``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

import mira

from . import parallel
from .backbone import normalize
from .dualgpm import GradientProjectionMemory, ProjectedParameter
from .queries import use_backbone_query
from .recipe import RecipeConfig
from .training import EarlyStop, StepStats, fit

__all__ = [
    "AdapterPool",
    "RecipeConfig",
    "RoutingMemory",
    "Task",
    "attach_memory_model",
    "backbone_head",
    "consolidate",
    "evaluate",
    "adapter_cross_accuracy",
    "features",
    "train_adapter_pool",
    "train_lora",
]


@dataclasses.dataclass
class Task:
    """One task: training and test images (B, C, H, W) in [0, 1], global labels, its classes.

    ``train_domain`` / ``test_domain``: (B,) int64 index of the domain each image comes from, for a
    task that pools domains (CIL); None for a task of one domain.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[int, ...]
    train_domain: torch.Tensor | None = None
    test_domain: torch.Tensor | None = None


def _seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=gen))


def _masked(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    # CIL: classes outside the current task get -inf, so their rows receive no gradient.
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask[: logits.shape[1]], float("-inf"))


class _HeadOnFrozenFeatures(nn.Module):
    """Logits when nothing before the head trains: the backbone runs without autograd (a large
    saving). A module, so that a data-parallel wrapper sees (and reduces) the head's gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.head(feats)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, embed_dim) final pre-logit features of images x (the model in its current stage)."""
    was_training = model.training
    model.eval()
    out = [model.forward_head(model.forward_features(normalize(x[i : i + batch_size])), pre_logits=True)
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else x.new_zeros(0, model.embed_dim)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             rows: int | None = None) -> float:
    """Top-1 accuracy of ``model`` (its own head; only its first ``rows`` logits if given).

    Under ``torchrun`` each rank scores its share of every batch and the counts are summed.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for shard in parallel.eval_batches(len(x), batch_size):
        logits = model(normalize(x[shard.indices]))
        if rows is not None:
            logits = logits[:, :rows]
        correct += (logits.argmax(-1) == y[shard.indices])[: shard.real].sum().item()
    model.train(was_training)
    (correct,) = parallel.sum_over_ranks([correct])
    return int(correct) / max(len(x), 1)


def backbone_head(backbone: nn.Module) -> nn.Linear:
    """A frozen copy of the backbone's pre-trained classifier: the shared head (CLIP's text head's role)."""
    head = copy.deepcopy(backbone.head)
    head.requires_grad_(False)
    return head


def attach_memory_model(backbone: nn.Module, *, rank: int, separation: str = "affine", query: str = "identity",
                        head_rows: int = 10, cfg: RecipeConfig | None = None) -> nn.Module:
    """A copy of the frozen backbone with MIRA attached to every block and a bias-free head."""
    cfg = cfg or RecipeConfig()
    model = copy.deepcopy(backbone)
    model.head = nn.Linear(model.embed_dim, head_rows, bias=False)
    mira.attach(model, rank=rank, slices=("q", "v"), query=query, separation=separation, key_norm=cfg.key_norm,
                key_init=cfg.key_init, query_token=cfg.query_token)
    if cfg.query_source == "backbone":
        use_backbone_query(model, backbone)
    return model


def train_lora(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig, gen: torch.Generator, *,
               class_mask: torch.Tensor | None = None, max_epochs: int | None = None, train_head: bool = True) -> dict:
    """Adaptation-stage training of the model's live LoRA (and head) on (x, y), in place.

    AdamW(lr, wd), batch ``cfg.batch_size``; stops after the first epoch whose running train
    accuracy exceeds ``cfg.early_stop_acc``, else after ``max_epochs``. Returns
    ``{"epochs": ..., "train_acc": ...}``.
    """
    mira.set_stage(model, "adaptation", extra_trainable=("head",) if train_head else ())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = parallel.wrap(model)
    model.train()

    def step(shard) -> StepStats:
        idx = shard.indices
        loss, stats = parallel.batch_loss(_masked(net(normalize(x[idx])), class_mask), y[idx], shard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return stats

    state = fit(step, parallel.GlobalBatchSampler(len(x), cfg.batch_size, _seed_from(gen)),
                epochs=max_epochs or cfg.max_epochs, early_stop=EarlyStop(cfg.early_stop_acc),
                reduce=parallel.reduce_stats)
    model.eval()
    return {"epochs": state.epochs_done, "train_acc": state.history[-1]["train_acc"]}


@dataclasses.dataclass
class AdapterPool:
    """Adapters of every task, in the order they were written.

    Attributes:
        bank_a: per block, (T * n, S, r, d_in) stored A factors.
        bank_b: per block, (T * n, S, d_s, r) stored B factors.
        heads: per task, the n adaptation heads (rows = that task's classes, in ``Task.classes``
            order, for CIL; all classes otherwise).
        slot_task: (T * n,) task index of every slot.
        info: per task and copy, epochs and train accuracy.
    """

    bank_a: list[torch.Tensor]
    bank_b: list[torch.Tensor]
    heads: list[list[torch.Tensor]]
    slot_task: torch.Tensor
    info: list[list[dict]]

    def task_slots(self, t: int) -> torch.Tensor:
        return torch.nonzero(self.slot_task == t).flatten()


def train_adapter_pool(backbone: nn.Module, tasks: Sequence[Task], cfg: RecipeConfig, seed: int, *,
                       local_labels: bool, progress=None, adapters_per_task: int | None = None) -> AdapterPool:
    """Adaptation stage for every task: ``cfg.adapters_per_task`` LoRAs per task, written into memory.

    Args:
        local_labels: CIL: each head has one row per class of its task (labels remapped to
            0..k-1; with the shared head, the other classes are masked); otherwise every head
            covers all classes (DIL / DG).
        progress: optional tqdm bar, advanced once per adapter.
        adapters_per_task: overrides ``cfg.adapters_per_task``.
    """
    copies = adapters_per_task or cfg.adapters_per_task
    num_classes = 1 + max(max(t.classes) for t in tasks)
    model = attach_memory_model(backbone, rank=cfg.rank, head_rows=num_classes, cfg=cfg)
    shared = cfg.adapt_head == "shared"
    heads: list[list[torch.Tensor]] = []
    info: list[list[dict]] = []
    slot_task = []
    for t, task in enumerate(tasks):
        heads.append([])
        info.append([])
        y, mask = task.train_y, None
        if local_labels and shared:
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[list(task.classes)] = True
        elif local_labels:
            remap = torch.full((num_classes,), -1, dtype=torch.long)
            remap[list(task.classes)] = torch.arange(len(task.classes))
            y = remap[y]
        rows = len(task.classes) if local_labels else num_classes
        for c in range(copies):
            gen = torch.Generator().manual_seed(10_000 * seed + 100 * t + c)
            for proj in mira.projections(model):
                proj.reset_lora(gen)
            if shared:
                model.head = backbone_head(backbone)
            else:
                head = nn.Linear(model.embed_dim, rows, bias=False)
                with torch.no_grad():
                    head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * model.embed_dim**-0.5)
                model.head = head
            info[t].append(train_lora(model, task.train_x, y, cfg, gen, class_mask=mask, train_head=not shared))
            weight = model.head.weight.detach().clone()
            heads[t].append(weight[list(task.classes)] if shared and local_labels else weight)
            mira.write_adapters(model, generator=gen)
            slot_task.append(t)
            if progress is not None:
                progress.update(1)
    mems = mira.memories(model)
    return AdapterPool(
        bank_a=[m.stored_adapters[0].clone() for m in mems],
        bank_b=[m.stored_adapters[1].clone() for m in mems],
        heads=heads,
        slot_task=torch.tensor(slot_task),
        info=info,
    )


@torch.no_grad()
def adapter_cross_accuracy(backbone: nn.Module, pool: AdapterPool, tasks: Sequence[Task], cfg: RecipeConfig) -> list:
    """acc[i][j]: test accuracy on task j of task i's first adapter with task i's own adaptation head.

    The diagonal is what perfect routing (one-hot weight on the right adapter, that adapter's own
    head) would give; the off-diagonal shows how specific each adapter + head pair is.
    """
    model = attach_memory_model(backbone, rank=cfg.rank, head_rows=pool.heads[0][0].shape[0], cfg=cfg)
    out = []
    for i in range(len(tasks)):
        slot = int(pool.task_slots(i)[0])
        for proj, a, b in zip(mira.projections(model), pool.bank_a, pool.bank_b):
            proj.lora_a.copy_(a[slot])
            proj.lora_b.copy_(b[slot])
        if cfg.adapt_head == "shared":
            model.head = backbone_head(backbone)
        else:
            model.head = nn.Linear(model.embed_dim, pool.heads[i][0].shape[0], bias=False)
            model.head.weight.copy_(pool.heads[i][0])
        mira.set_stage(model, "adaptation")
        out.append([evaluate(model, t.test_x, t.test_y) for t in tasks])
    return out


def append_task_adapters(model: nn.Module, pool: AdapterPool, t: int, keys: Sequence[torch.Tensor], *,
                         first_block: str = "route") -> None:
    """Store task ``t``'s adapters in every block's memory with the given (n, d_k) keys per block
    (``first_block="off"``: not in block 0's, which stays empty)."""
    slots = pool.task_slots(t)
    for block, (mem, a, b, k) in enumerate(zip(mira.memories(model), pool.bank_a, pool.bank_b, keys)):
        if block == 0 and first_block == "off":
            continue
        mem.append(a[slots], b[slots], k)


def _within_class_mixup(x: torch.Tensor, y: torch.Tensor, shard, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Mixed images of this rank's share of one global batch (x, y: the whole training set).

    Partner of each sample: a random sample of the same class in the global batch (itself if
    alone). The draws are made for the whole global batch on every rank (``gen`` and the global
    generator in the same state everywhere), so K ranks mix exactly as one process does.
    """
    yg = y[shard.global_indices]
    partner = torch.arange(len(yg))
    for c in yg.unique():
        idx = torch.nonzero(yg == c).flatten()
        partner[idx] = idx[torch.randperm(len(idx), generator=gen)]
    lam = torch.distributions.Beta(alpha, alpha).sample((len(yg),))
    pos = shard.position
    lam = lam[pos].view(-1, *([1] * (x.dim() - 1)))
    return lam * x[shard.global_indices[pos]] + (1 - lam) * x[shard.global_indices[partner[pos]]]


def gpm_modules(model: nn.Module) -> list[tuple[ProjectedParameter, nn.Module, str]]:
    """What DualGPM protects: (parameter binding, module whose activations define it, 'in'/'out').

    Keys of block l are protected against the queries of block l (output of its query module);
    every nn.Linear of a query module and the head against their inputs.
    """
    out = []
    for block, mem in enumerate(mira.memories(model)):
        out.append((ProjectedParameter(f"keys.{block}", mem.keys), mem.query_module, "out"))
        for name, sub in mem.query_module.named_modules():
            if isinstance(sub, nn.Linear):
                out.append((ProjectedParameter(f"query.{block}.{name}", sub.weight, sub.bias), sub, "in"))
    head = model.head
    out.append((ProjectedParameter("head", head.weight, head.bias), head, "in"))
    return out


@torch.no_grad()
def gpm_update(model: nn.Module, gpm: GradientProjectionMemory, x: torch.Tensor) -> dict[str, int]:
    """Grow the DualGPM bases from one batch x of the task just learned; returns the new ranks. An
    empty batch adds nothing (as empty activations do in GradientProjectionMemory.update)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    bindings = gpm_modules(model)
    if len(x) == 0:  # eval_batches(0, 0) raised "batch_size must be an int >= 1, got 0"
        return {pp.name: gpm.rank(pp.name) for pp, _, _ in bindings}
    for pp, module, where in bindings:
        def hook(mod, args, output, pp=pp, where=where):
            captured[pp.name] = (output if where == "out" else args[0]).detach()
        handles.append(module.register_forward_hook(hook))
    # Under torchrun each rank computes its share of the batch; the rows are gathered in the
    # batch's order and rank 0's bases are broadcast, so every rank projects with the same bases.
    shard = parallel.eval_batches(len(x), len(x)).shard(0)
    try:
        model.eval()
        model(normalize(x[shard.indices]))
    finally:
        for h in handles:
            h.remove()
    rows = {pp.name: pp.augment(parallel.gather_global_rows(captured[pp.name], shard))
            for pp, _, _ in bindings if pp.name in captured}
    # Checked for every binding before any basis grows (update refuses non-finite rows, but one at a
    # time: a later binding's inf would leave the earlier bases grown), so a refused call changes nothing.
    bad = [name for name, r in rows.items() if not bool(torch.isfinite(r).all())]
    if bad:
        raise ValueError(f"gpm_update: the activations of {bad} hold non-finite values (NaN or inf); no basis "
                         "was changed: find where the forward overflows")
    for name, r in rows.items():
        gpm.update(name, r)
    parallel.share_gpm_(gpm)
    return {pp.name: gpm.rank(pp.name) for pp, _, _ in bindings}


class _QueryTap:
    """Records each memory's (B, d_k) queries during a forward, keeping them differentiable."""

    def __init__(self, model: nn.Module):
        self.projs = mira.projections(model)
        self.queries: list[torch.Tensor | None] = [None] * len(self.projs)
        self._handles = [p.register_forward_pre_hook(self._hook(i)) for i, p in enumerate(self.projs)]

    def _hook(self, i):
        def hook(module, args):
            self.queries[i] = module.memory.make_query(args[0])
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class RoutingMemory:
    """Per task and block: the mean query of the task's images and, for ``replay``, its weights then.

    A few d_k vectors per task and block, no images (``routing="replay"`` / ``"supervised"``).
    """

    def __init__(self):
        self.mean_queries: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def state_dict(self) -> dict:
        """The stored queries and weights (copies), for checkpoints."""
        return {"mean_queries": {t: [q.clone() for q in qs] for t, qs in self.mean_queries.items()},
                "weights": {t: [w.clone() for w in ws] for t, ws in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean_queries = {int(t): list(qs) for t, qs in state["mean_queries"].items()}
        self.weights = {int(t): list(ws) for t, ws in state["weights"].items()}

    @torch.no_grad()
    def record(self, model: nn.Module, t: int, x: torch.Tensor) -> None:
        tap = _QueryTap(model)
        try:
            model.eval()
            model(normalize(x))
        finally:
            tap.close()
        means = [q.mean(0, keepdim=True) for q in tap.queries]
        self.mean_queries[t] = means
        self.weights[t] = [p.memory.get_association_matrix(m)[0] for p, m in zip(tap.projs, means)]

    def loss(self, tap: _QueryTap, mode: str, slot_task: torch.Tensor, batch_task: torch.Tensor) -> torch.Tensor:
        """Mean over blocks of ||w - target||^2: the batch's queries (supervised) and old tasks' stored ones."""
        total = 0.0
        n = int(slot_task.numel())
        own = (slot_task.view(1, -1) == batch_task.view(-1, 1)).float()
        for i, proj in enumerate(tap.projs):
            mem = proj.memory
            if mode == "supervised":
                w = mem.get_association_matrix(tap.queries[i])
                total = total + ((w - own / own.sum(1, keepdim=True)) ** 2).sum(1).mean()
            for t, means in self.mean_queries.items():
                w_old = mem.get_association_matrix(means[i])[0]
                if mode == "supervised":
                    target = (slot_task == t).float()
                    target = target / target.sum()
                else:
                    target = torch.zeros(n, dtype=w_old.dtype)
                    target[: len(self.weights[t][i])] = self.weights[t][i]
                total = total + ((w_old - target) ** 2).sum()
        return total / max(len(tap.projs), 1)


def consolidate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig, gen: torch.Generator, *,
                train_keys: bool = True, train_head: bool = True, class_mask: torch.Tensor | None = None,
                gpm: GradientProjectionMemory | None = None, mixup: bool = False, key_lr: float | None = None,
                epochs: int | None = None, routing: RoutingMemory | None = None,
                slot_task: torch.Tensor | None = None, sample_task: torch.Tensor | None = None) -> dict:
    """Consolidation stage on (x, y): adapters frozen, keys + query modules (if ``train_keys``) and head train.

    With ``gpm``, every optimiser step is projected: the update of each protected parameter
    (keys, query-module linears, head) is replaced by its component orthogonal to the stored
    basis. The update, not only the gradient, is projected, because Adam's per-coordinate
    scaling and weight decay would otherwise move a projected gradient back into the protected
    space. ``cfg.gpm_keys="fixed_norm"`` then gives each key's component outside the protected
    space its norm back, so cosines with protected queries stay fixed. With ``routing``
    (and ``cfg.routing`` not ``none``), the routing penalty of :class:`RoutingMemory` is added;
    ``slot_task`` (N,) is the task of every stored slot and ``sample_task`` (n,) that of every
    training image.
    """
    mira.set_stage(model, "consolidation", extra_trainable=("head",) if train_head else ())
    groups = []
    if train_head:
        groups.append({"params": list(model.head.parameters()), "lr": cfg.head_lr,
                       "weight_decay": cfg.head_weight_decay})
    else:
        model.head.requires_grad_(False)
    if train_keys:
        groups.append({"params": mira.trainable_parameters(model, "consolidation"),
                       "lr": cfg.key_lr if key_lr is None else key_lr, "weight_decay": cfg.weight_decay})
    else:
        for p in mira.trainable_parameters(model, "consolidation"):
            p.requires_grad_(False)
    if not groups:
        mira.set_stage(model, "inference")
        return {"final_loss": float("nan"), "last_epoch_train_acc": float("nan")}
    opt = torch.optim.AdamW(groups)
    bindings = [pp for pp, _, _ in gpm_modules(model)] if gpm is not None else []
    bindings = [pp for pp in bindings if pp.weight.requires_grad and pp.name in gpm]
    use_routing = routing is not None and cfg.routing != "none" and train_keys
    # fixed_norm: per key, the component orthogonal to the protected query space keeps its norm, so
    # |k| and every protected dot product q . k stay as they were: cos(q, k) is protected too.
    sphere = []
    if train_keys and cfg.gpm_keys == "fixed_norm" and gpm is not None:
        for block, mem in enumerate(mira.memories(model)):
            if f"keys.{block}" in gpm and gpm.rank(f"keys.{block}"):
                sphere.append((mem.keys, gpm.basis(f"keys.{block}").to(mem.keys.dtype)))
    net = parallel.wrap(model if train_keys else _HeadOnFrozenFeatures(model))
    if mixup:
        parallel.sync_global_rng_()
    model.train()
    tap = _QueryTap(model) if use_routing else None

    def step(shard) -> StepStats:
        idx = shard.indices
        xb = _within_class_mixup(x, y, shard, cfg.mixup_alpha, gen) if mixup else x[idx]
        loss, stats = parallel.batch_loss(_masked(net(normalize(xb)), class_mask), y[idx], shard)
        if use_routing:
            # The share's part of the global batch's penalty: the batch term is a mean over the
            # share, the old tasks' term is the same on every rank; real / G of each sums to it.
            share = shard.real / shard.global_size
            penalty = routing.loss(tap, cfg.routing, slot_task, sample_task[idx])
            loss = loss + cfg.routing_weight * (penalty if share == 1 else penalty * share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for pp in bindings:
            pp.project(gpm)
        before = [(pp, pp.weight.detach().clone(), None if pp.bias is None else pp.bias.detach().clone())
                  for pp in bindings]
        perp_norms = [(k - k @ u @ u.T).detach().norm(dim=1, keepdim=True) for k, u in sphere]
        opt.step()
        for pp, w0, b0 in before:
            _project_update(pp, w0, b0, gpm)
        with torch.no_grad():
            for (k, u), n0 in zip(sphere, perp_norms):
                inside = k @ u @ u.T
                perp = k - inside
                k.copy_(inside + perp * (n0 / perp.norm(dim=1, keepdim=True).clamp_min(1e-12)))
        return stats

    try:
        state = fit(step, parallel.GlobalBatchSampler(len(x), cfg.batch_size, _seed_from(gen)),
                    epochs=cfg.consolidation_epochs if epochs is None else epochs, reduce=parallel.reduce_stats)
    finally:
        if tap is not None:
            tap.close()
    model.eval()
    mira.set_stage(model, "inference")
    last = state.history[-1] if state.history else {"loss": float("nan"), "train_acc": float("nan")}
    return {"final_loss": last["loss"], "last_epoch_train_acc": last["train_acc"]}


@torch.no_grad()
def _project_update(pp: ProjectedParameter, w0: torch.Tensor, b0: torch.Tensor | None,
                    gpm: GradientProjectionMemory) -> None:
    dw = pp.weight - w0
    if pp.bias is None:
        gpm.project_(pp.name, dw)
        pp.weight.copy_(w0 + dw)
        return
    joint = torch.cat([dw, (pp.bias - b0).unsqueeze(-1)], dim=-1)
    gpm.project_(pp.name, joint)
    pp.weight.copy_(w0 + joint[..., :-1])
    pp.bias.copy_(b0 + joint[..., -1])
