"""The DG / DIL / CIL protocols of method.md section 3, with the controls run beside MIRA.

A :class:`Variant` is a *kind* (how the memory is used) with a :class:`~.recipe.RecipeConfig`.
Kinds (same adapters, same initial random keys, same head initialisation; the same data order,
except that the routing-replay kind draws from the shared generator once more per task, which
shifts its later tasks' consolidation order):

============== ==================================================================================
mira           keys (+ query module) and head trained in consolidation, as the recipe says
no_adapters    the frozen backbone and the head only (an empty memory): what the adapters add
uniform_mean   every stored adapter with weight 1/N (softmax over identical frozen keys, exactly
               uniform); only the head trains: the adapters without any retrieval
oracle         one-hot routing on the adapters of the task the image comes from (the task id is
               given, also at test time); only the head trains: what perfect routing reaches
random_keys    the random keys written at adaptation never trained (query module frozen); only
               the head trains: what key learning adds
seq_lora       DIL / CIL: one LoRA + head fine-tuned task after task; the forgetting reference
joint_lora     one LoRA + head trained on the union of all tasks (DIL / CIL) or all source
               domains (DG) in one go: the upper reference, no forgetting by construction
============== ==================================================================================

The head follows the recipe: ``fresh_bias`` (a new linear head with bias), ``adaptation``
(bias-free, from the adaptation heads) or ``shared`` (the backbone's frozen head). CIL: a growing
bias-free head whose new rows come from that task's adaptation heads, old-class logits masked
while a task trains (with the shared head: its rows, masked the same way). DualGPM projects
keys, query modules and head from the second task on (``ProtocolConfig.gpm``), for every memory kind:
the oracle's head too (its keys are constant), so that its row is the same protected head reading a
perfect router.

The analyses of a finished model (:func:`linear_probe`, :func:`retrieval_profile`, :func:`weight_mass`,
:func:`query_geometry`) read at most N images per task: a subset drawn with the run's seed, stratified
by class and, where a task pools domains (CIL), by domain (:func:`stratified_subset`). Prefixes would
not do: the domains' images are stored in class order (mnist, mnist_m) and a CIL task's in domain order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

import mira

from .data import Domain
from .dualgpm import GradientProjectionMemory
from .metrics import average_accuracy, average_forgetting
from .recipe import RecipeConfig
from .resume import TaskCheckpoint, load_trained_tensors, trained_tensors
from .stages import (
    AdapterPool,
    RoutingMemory,
    Task,
    append_task_adapters,
    attach_memory_model,
    backbone_head,
    consolidate,
    evaluate,
    features,
    gpm_update,
    train_lora,
)

__all__ = [
    "CL_VARIANTS",
    "DG_VARIANTS",
    "KINDS",
    "ProtocolConfig",
    "Variant",
    "cil_tasks",
    "dil_tasks",
    "linear_probe",
    "run_continual",
    "run_dg_fold",
    "query_geometry",
    "retrieval_profile",
    "stratified_subset",
    "weight_mass",
]

KINDS = ("mira", "no_adapters", "uniform_mean", "oracle", "random_keys", "seq_lora", "joint_lora")
MEMORY_KINDS = ("mira", "no_adapters", "uniform_mean", "oracle", "random_keys")
#: Kinds of the continual and DG tables (the names the command line shows for the base recipe).
CL_VARIANTS = KINDS
DG_VARIANTS = ("mira", "no_adapters", "uniform_mean", "random_keys", "joint_lora")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row of a table: ``kind`` run with ``recipe``, shown as ``name``."""

    name: str
    kind: str
    recipe: RecipeConfig

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")


@dataclasses.dataclass
class ProtocolConfig:
    """Protocol-level settings; ``recipe`` holds the stage hyper-parameters of plain-kind variants."""

    recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)
    joint_epochs: int = 2
    dg_consolidation_epochs: int = 1  # every row and preset: the recipe's consolidation_epochs is not read by DG
    cil_adapters_per_task: int = 2
    dg_mixup: bool = True
    gpm: bool = True
    cil_classes_per_task: int = 2
    num_classes: int = 10
    probe_max_iter: int = 300  # L-BFGS iterations of the linear probe (quick mode: fewer)


def _as_variant(variant: str | Variant, cfg: ProtocolConfig) -> Variant:
    return variant if isinstance(variant, Variant) else Variant(variant, variant, cfg.recipe)


def dil_tasks(domains: Sequence[Domain], num_classes: int = 10) -> list[Task]:
    """DIL: one task per domain, every task has every class."""
    return [Task(d.name, d.train_x, d.train_y, d.test_x, d.test_y, tuple(range(num_classes))) for d in domains]


def cil_tasks(domains: Sequence[Domain], classes_per_task: int = 2, num_classes: int = 10) -> list[Task]:
    """CIL: tasks are disjoint class groups (0-1, 2-3, ...), images pooled from every domain (in domain
    order; ``train_domain`` / ``test_domain`` say which)."""
    x_tr = torch.cat([d.train_x for d in domains])
    y_tr = torch.cat([d.train_y for d in domains])
    x_te = torch.cat([d.test_x for d in domains])
    y_te = torch.cat([d.test_y for d in domains])
    d_tr = torch.cat([torch.full((len(d.train_y),), i, dtype=torch.int64) for i, d in enumerate(domains)])
    d_te = torch.cat([torch.full((len(d.test_y),), i, dtype=torch.int64) for i, d in enumerate(domains)])
    tasks = []
    for start in range(0, num_classes, classes_per_task):
        cls = tuple(range(start, min(start + classes_per_task, num_classes)))
        tr = torch.isin(y_tr, torch.tensor(cls))
        te = torch.isin(y_te, torch.tensor(cls))
        tasks.append(Task(f"classes {cls[0]}-{cls[-1]}", x_tr[tr], y_tr[tr], x_te[te], y_te[te], cls,
                          train_domain=d_tr[tr], test_domain=d_te[te]))
    return tasks


def stratified_subset(labels: torch.Tensor, n: int, seed: int, domains: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted) of at most ``n`` of ``len(labels)`` items: a seeded subset stratified by label
    and, given ``domains``, by (domain, label).

    Each stratum contributes in proportion to its size (within one item), and every stratum at least one
    item while ``n`` allows (an item's rank r within its shuffled stratum of size m is keyed r / m, so
    the first item of each is keyed 0). Deterministic given ``seed``; all items when ``n >= len(labels)``.
    """
    total = len(labels)
    if n >= total:
        return torch.arange(total)
    strata = labels.long() if domains is None else domains.long() * (int(labels.max()) + 1) + labels.long()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=gen)
    s = strata[perm]
    order = torch.sort(s, stable=True).indices  # grouped by stratum, shuffled within each
    _, counts = torch.unique_consecutive(s[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    key = torch.empty(total, dtype=torch.float64)
    key[order] = (torch.arange(total) - starts).double() / torch.repeat_interleave(counts, counts).double()
    return perm[torch.sort(key, stable=True).indices[:n]].sort().values  # ties: the shuffled order


def _subset_seed(seed: int, t: int, split: str) -> int:
    # One stream per (run seed, task, split), apart from the generators that train the model.
    return (1_000_003 * seed + 1009 * t + (1 if split == "test" else 0) + 77_777) % 2**63


def _task_subset(task: Task, t: int, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of at most ``n`` of task ``t``'s ``split`` images, stratified (:func:`stratified_subset`)."""
    x, y, dom = ((task.train_x, task.train_y, task.train_domain) if split == "train"
                 else (task.test_x, task.test_y, task.test_domain))
    idx = stratified_subset(y, n, _subset_seed(seed, t, split), dom)
    return x[idx], y[idx]


def _separation(kind: str, rc: RecipeConfig) -> str:
    return "softmax" if kind in ("uniform_mean", "oracle") else rc.separation


def _first_block(kind: str, rc: RecipeConfig) -> str:
    # The controls (uniform mean, oracle, random keys) use every block, whatever the recipe routes.
    return rc.first_block if kind == "mira" else "route"


def _task_keys(kind: str, model: nn.Module, n: int, seed: int, t: int, rc: RecipeConfig) -> list[torch.Tensor]:
    """Keys for task t's n adapters in each block: the same draw for every kind (so random_keys is
    exactly mira's starting point), identical constant keys for uniform_mean and oracle."""
    keys = []
    for block, mem in enumerate(mira.memories(model)):
        d_k = mem.config.d_k
        if kind in ("uniform_mean", "oracle"):
            keys.append(torch.ones(n, d_k))
            continue
        gen = torch.Generator().manual_seed(1_000_003 * seed + 1009 * t + block)
        if rc.key_init == "uniform":
            keys.append(torch.rand(n, d_k, generator=gen) * 2 - 1)
        else:
            keys.append(torch.randn(n, d_k, generator=gen))
    return keys


def _head_init(pool: AdapterPool, t: int) -> torch.Tensor:
    return torch.stack(pool.heads[t]).mean(0)


def _lora_model(backbone: nn.Module, rc: RecipeConfig, rows: int, gen: torch.Generator) -> nn.Module:
    model = attach_memory_model(backbone, rank=rc.rank, head_rows=rows, cfg=rc)
    for proj in mira.projections(model):
        proj.reset_lora(gen)
    if rc.adapt_head == "shared":
        model.head = backbone_head(backbone)
    else:
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * model.embed_dim**-0.5)
    return model


def _grow_head(model: nn.Module, rows: int, new_rows: dict[int, torch.Tensor] | None,
               gen: torch.Generator) -> None:
    """Replace the bias-free head by one with ``rows`` rows: old rows kept, new rows from
    ``new_rows`` (class -> (d,) weight) or random."""
    old = model.head.weight.detach()
    head = nn.Linear(model.embed_dim, rows, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * model.embed_dim**-0.5)
        head.weight[: old.shape[0]] = old
        for c, w in (new_rows or {}).items():
            head.weight[c] = w
    model.head = head


def _class_mask(task: Task, total: int) -> torch.Tensor:
    mask = torch.zeros(total, dtype=torch.bool)
    mask[list(task.classes)] = True
    return mask


def _set_memory(model: nn.Module, pool: AdapterPool, slots: torch.Tensor) -> None:
    """Oracle: the memory holds exactly ``slots`` (identical keys, softmax: equal weights)."""
    for mem, a, b in zip(mira.memories(model), pool.bank_a, pool.bank_b):
        mem.clear()
        mem.append(a[slots], b[slots], torch.ones(len(slots), mem.config.d_k))


def _initial_head(model: nn.Module, backbone: nn.Module, rc: RecipeConfig, pool: AdapterPool | None,
                  tasks_for_init: Sequence[int], rows: int, cil: bool) -> bool:
    """Install the consolidation head the recipe asks for; returns whether it trains."""
    if rc.head == "shared":
        model.head = backbone_head(backbone)
        return False
    if rc.head == "fresh_bias" and not cil:
        model.head = nn.Linear(model.embed_dim, rows, bias=True)  # seeded by torch.manual_seed(seed)
        return True
    with torch.no_grad():
        model.head.weight.copy_(torch.stack([_head_init(pool, t) for t in tasks_for_init]).mean(0))
    return True


def _end_task(model: nn.Module, kind: str, lora_head_trains: bool) -> None:
    """Put ``model`` in the state a finished task leaves it in: the stage its kind last trained in
    (consolidation ends in ``inference``; ``seq_lora`` stays in ``adaptation``, its live LoRA being
    the model), what that stage trains, eval mode. Every task ends here and so does loading a saved
    state, so a resumed run goes on (or ends: probe, retrieval profile, weight mass) from the model
    an uninterrupted run had; the checkpoint restores tensors, not the stage."""
    if kind == "seq_lora":
        mira.set_stage(model, "adaptation", extra_trainable=("head",) if lora_head_trains else ())
    else:
        mira.set_stage(model, "inference")
    model.eval()


def run_continual(setting: str, variant: str | Variant, backbone: nn.Module, tasks: Sequence[Task],
                  pool: AdapterPool | None, cfg: ProtocolConfig, seed: int, *,
                  step: Callable[[], None] | None = None, keep_model: bool = False,
                  checkpoint: str | os.PathLike | None = None) -> dict:
    """DIL or CIL run of one variant. Returns the accuracy matrix, average accuracy and forgetting.

    ``acc[i][j]``: accuracy on task j's test set after task i (nan above the diagonal).
    ``checkpoint``: a file saved after every task; a run given the file of a run that stopped
    resumes after its last finished task and ends as that run would have (:mod:`.resume`); the file of
    a run with other arguments (recipe, ``cfg``, tasks' data, ``pool``, ``backbone``) is refused.
    ``joint_lora`` has no tasks to resume between and ignores it.
    """
    if setting not in ("dil", "cil"):
        raise ValueError(f"setting must be 'dil' or 'cil', got {setting!r}")
    v = _as_variant(variant, cfg)
    kind, rc = v.kind, v.recipe
    gen = torch.Generator().manual_seed(7919 * seed + 17)
    torch.manual_seed(seed)
    cil = setting == "cil"
    num_classes = cfg.num_classes
    nt = len(tasks)
    shared = rc.head == "shared"
    lora_head_trains = rc.adapt_head != "shared"
    out: dict = {"variant": v.name, "kind": kind, "seed": seed}

    if kind == "joint_lora":
        model = _lora_model(backbone, rc, num_classes, gen)
        x = torch.cat([t.train_x for t in tasks])
        y = torch.cat([t.train_y for t in tasks])
        out["train"] = train_lora(model, x, y, rc, gen, max_epochs=cfg.joint_epochs,
                                  train_head=rc.adapt_head != "shared")
        final = [evaluate(model, t.test_x, t.test_y) for t in tasks]
        out.update(final_row=final, avg_acc=sum(final) / nt, forgetting=None)
        if keep_model:
            out["model"] = model
        if step:
            step()
        return out

    acc = [[float("nan")] * nt for _ in range(nt)]
    gpm = GradientProjectionMemory(rc.gpm_threshold, enabled=cfg.gpm) if kind in MEMORY_KINDS else None
    routing = RoutingMemory() if kind == "mira" and rc.routing != "none" else None
    first_rows = len(tasks[0].classes) if cil and not shared else num_classes
    train_head = True
    if kind == "seq_lora":
        model = _lora_model(backbone, rc, first_rows, gen)
    else:
        model = attach_memory_model(backbone, rank=rc.rank, separation=_separation(kind, rc), query="identity",
                                    head_rows=first_rows, cfg=rc)
        train_head = _initial_head(model, backbone, rc, pool, [0], first_rows, cil)
    ranks = []
    ckpt = None
    if checkpoint is not None:
        ckpt = TaskCheckpoint(checkpoint, _run_identity(setting, v, cfg, seed, tasks, pool, backbone))
    saved = ckpt.load() if ckpt is not None else None
    start = 0
    if saved is not None:
        start, acc, ranks = saved["tasks_done"], saved["acc"], saved["gpm_ranks"]
        load_trained_tensors(model, saved["model"])
        if gpm is not None:
            gpm.load_state_dict(saved["gpm"])
        if routing is not None:
            routing.load_state_dict(saved["routing"])
        if "consolidation" in saved:
            out["consolidation"] = saved["consolidation"]
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["global_generator"])
        _end_task(model, kind, lora_head_trains)
    for t, task in enumerate(tasks):
        if t < start:
            continue
        seen = 1 + max(task.classes)
        mask = _class_mask(task, num_classes) if cil else None
        if kind == "seq_lora":
            if cil and t > 0 and lora_head_trains:
                _grow_head(model, seen, None, gen)
            train_lora(model, task.train_x, task.train_y, rc, gen, class_mask=mask, train_head=lora_head_trains)
        else:
            if kind == "oracle":
                _set_memory(model, pool, pool.task_slots(t))
            elif kind != "no_adapters":
                n = len(pool.task_slots(t))
                append_task_adapters(model, pool, t, _task_keys(kind, model, n, seed, t, rc),
                                     first_block=_first_block(kind, rc))
            if cil and t > 0 and not shared:
                rows = {c: w for c, w in zip(task.classes, _head_init(pool, t))} if pool is not None else None
                _grow_head(model, seen, rows, gen)
            slot_task = pool.slot_task[: mira.memories(model)[-1].num_slots] if pool is not None else None
            out.setdefault("consolidation", []).append(
                consolidate(model, task.train_x, task.train_y, rc, gen, train_keys=kind == "mira",
                            train_head=train_head, class_mask=mask, gpm=gpm if t > 0 else None, routing=routing,
                            slot_task=slot_task, sample_task=torch.full((len(task.train_x),), t)))
            if gpm is not None and gpm.enabled:  # the oracle too: its head is protected as every other's
                idx = torch.randperm(len(task.train_x), generator=gen)[: rc.gpm_batch]
                ranks.append(gpm_update(model, gpm, task.train_x[idx]))
            if routing is not None:
                idx = torch.randperm(len(task.train_x), generator=gen)[: rc.gpm_batch]
                routing.record(model, t, task.train_x[idx])
        for j in range(t + 1):
            if kind == "oracle":
                _set_memory(model, pool, pool.task_slots(j))
            acc[t][j] = evaluate(model, tasks[j].test_x, tasks[j].test_y, rows=seen if cil else None)
        if kind == "oracle":
            _set_memory(model, pool, pool.task_slots(t))
        _end_task(model, kind, lora_head_trains)
        if ckpt is not None:
            state = {"tasks_done": t + 1, "acc": acc, "gpm_ranks": ranks, "model": trained_tensors(model),
                     "generator": gen.get_state(), "global_generator": torch.get_rng_state()}
            if gpm is not None:
                state["gpm"] = gpm.state_dict()
            if routing is not None:
                state["routing"] = routing.state_dict()
            if "consolidation" in out:
                state["consolidation"] = out["consolidation"]
            ckpt.save(state)
        if step:
            step()
    out.update(acc=acc, avg_acc=average_accuracy(acc), forgetting=average_forgetting(acc), final_row=acc[-1])
    if ranks:
        out["gpm_ranks"] = ranks
    if kind != "oracle":
        out["probe"] = linear_probe(model, tasks, max_iter=cfg.probe_max_iter, seed=seed)
    if keep_model:
        out["model"] = model
    return out


def _digest(tensors) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes, in order: exact, and cheap beside training on them."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _run_identity(setting: str, v: Variant, cfg: ProtocolConfig, seed: int, tasks: Sequence[Task],
                  pool: AdapterPool | None, backbone: nn.Module) -> dict:
    """What a checkpoint of :func:`run_continual` must match to be resumed: every argument the run's
    state depends on. The names and recipe alone let a file of another ProtocolConfig (e.g. ``gpm``
    off), another pool (another seed's adapters), backbone or data under the same task names be
    resumed as this run's. The same command line on the same machine (and world size) rebuilds the same
    data, backbone (cache) and pool (deterministic), so its files still resume."""
    def task_tensors(t: Task) -> list[torch.Tensor]:
        return [x for x in (t.train_x, t.train_y, t.test_x, t.test_y, t.train_domain, t.test_domain)
                if x is not None]

    return {"setting": setting, "variant": v.name, "kind": v.kind, "seed": seed, "tasks": [t.name for t in tasks],
            "recipe": dataclasses.asdict(v.recipe),
            "protocol": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "recipe"},
            "data": [{"classes": list(t.classes), "shapes": [list(x.shape) for x in task_tensors(t)],
                      "sha256": _digest(task_tensors(t))} for t in tasks],
            "pool": None if pool is None else {
                "slot_task": pool.slot_task.tolist(),
                "sha256": _digest([*pool.bank_a, *pool.bank_b, *(h for heads in pool.heads for h in heads)])},
            "backbone_sha256": _digest(backbone.state_dict().values())}


@torch.no_grad()
def linear_probe(model: nn.Module, tasks: Sequence[Task], max_train: int = 600, max_iter: int = 300,
                 seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on the model's final features of every task.

    Separates what the features hold from what the model's own head reads out of them. For cost, at
    most ``max_train`` training images per task: a subset drawn with ``seed``, stratified by class and
    (CIL) domain (:func:`stratified_subset`); tested on every test image.
    """
    from sklearn.linear_model import LogisticRegression

    train = [_task_subset(task, t, "train", max_train, seed) for t, task in enumerate(tasks)]
    xs = torch.cat([features(model, x) for x, _ in train]).double().numpy()
    ys = torch.cat([y for _, y in train]).numpy()
    xt = torch.cat([features(model, t.test_x) for t in tasks]).double().numpy()
    yt = torch.cat([t.test_y for t in tasks]).numpy()
    mean, std = xs.mean(0), xs.std(0) + 1e-6
    clf = LogisticRegression(max_iter=max_iter, C=1.0)
    clf.fit((xs - mean) / std, ys)
    return float((clf.predict((xt - mean) / std) == yt).mean())


def run_dg_fold(variant: str | Variant, backbone: nn.Module, domains_tasks: Sequence[Task], held_out: int,
                pool: AdapterPool, cfg: ProtocolConfig, seed: int, *, keep_model: bool = False) -> dict:
    """Leave-one-domain-out: train on every other domain, report accuracy on the held-out test set."""
    v = _as_variant(variant, cfg)
    kind, rc = v.kind, v.recipe
    if kind in ("seq_lora", "oracle"):
        raise ValueError(f"kind {kind!r} has no DG form (the held-out domain has no adapter of its own)")
    gen = torch.Generator().manual_seed(7919 * seed + 31 * held_out + 5)
    torch.manual_seed(seed)
    sources = [i for i in range(len(domains_tasks)) if i != held_out]
    x = torch.cat([domains_tasks[i].train_x for i in sources])
    y = torch.cat([domains_tasks[i].train_y for i in sources])
    sample_task = torch.cat([torch.full((len(domains_tasks[i].train_x),), i) for i in sources])
    target = domains_tasks[held_out]
    out: dict = {"variant": v.name, "kind": kind, "seed": seed, "held_out": target.name}
    if kind == "joint_lora":
        model = _lora_model(backbone, rc, cfg.num_classes, gen)
        out["train"] = train_lora(model, x, y, rc, gen, max_epochs=cfg.joint_epochs,
                                  train_head=rc.adapt_head != "shared")
    else:
        model = attach_memory_model(backbone, rank=rc.rank, separation=_separation(kind, rc), query="mlp",
                                    head_rows=cfg.num_classes, cfg=rc)
        if kind != "no_adapters":
            for t in sources:
                append_task_adapters(model, pool, t, _task_keys(kind, model, len(pool.task_slots(t)), seed, t, rc),
                                     first_block=_first_block(kind, rc))
        train_head = _initial_head(model, backbone, rc, pool, sources, cfg.num_classes, cil=False)
        slot_task = torch.cat([pool.slot_task[pool.slot_task == t] for t in sources]) if pool is not None else None
        routing = RoutingMemory() if kind == "mira" and rc.routing == "supervised" else None
        out["train"] = consolidate(model, x, y, rc, gen, train_keys=kind == "mira", train_head=train_head,
                                   mixup=cfg.dg_mixup, epochs=cfg.dg_consolidation_epochs,
                                   key_lr=rc.lr * rc.dg_key_lr_factor if rc.routing == "none" else None,
                                   routing=routing, slot_task=slot_task, sample_task=sample_task)
    out["held_out_acc"] = evaluate(model, target.test_x, target.test_y)
    if keep_model:
        out["model"] = model
    return out


@torch.no_grad()
def query_geometry(model: nn.Module, tasks: Sequence[Task], max_samples: int = 256, seed: int = 0) -> list[dict]:
    """Per block: how far apart the tasks' queries are (why retrieval can or cannot route), from at most
    ``max_samples`` test images per task (a stratified subset drawn with ``seed``, :func:`stratified_subset`).

    Returns, per block, ``within`` (mean cosine between queries of the same task),
    ``between`` (mean cosine between queries of different tasks) and ``centroid_cos``
    ((T, T) cosines of the tasks' mean queries).
    """
    from .backbone import normalize

    projs = mira.projections(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0]))
               for i, p in enumerate(projs)]
    queries: list[list[torch.Tensor]] = [[] for _ in projs]
    model.eval()
    try:
        for t, task in enumerate(tasks):
            model(normalize(_task_subset(task, t, "test", max_samples, seed)[0]))
            for i, p in enumerate(projs):
                queries[i].append(torch.nn.functional.normalize(p.memory.make_query(captured[i]), dim=-1))
    finally:
        for h in handles:
            h.remove()
    out = []
    for qs in queries:
        labels = torch.cat([torch.full((len(q),), t) for t, q in enumerate(qs)])
        allq = torch.cat(qs)
        sim = allq @ allq.T
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(allq), dtype=torch.bool)
        cent = torch.nn.functional.normalize(torch.stack([q.mean(0) for q in qs]), dim=-1)
        out.append({"within": sim[same & off].mean().item(), "between": sim[~same].mean().item(),
                    "centroid_cos": (cent @ cent.T).tolist()})
    return out


def _block_weights(model: nn.Module, tasks: Sequence[Task], max_samples: int, seed: int) -> list[list[torch.Tensor]]:
    """[block][task]: the (n, N) retrieval weights of (at most ``max_samples`` of) each task's test images,
    a stratified subset drawn with ``seed`` (:func:`stratified_subset`)."""
    from .backbone import normalize

    projs = mira.projections(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0]))
               for i, p in enumerate(projs)]
    out: list[list[torch.Tensor]] = [[] for _ in projs]
    model.eval()
    try:
        for t, task in enumerate(tasks):
            model(normalize(_task_subset(task, t, "test", max_samples, seed)[0]))
            for i, p in enumerate(projs):
                out[i].append(p.memory.get_association_matrix(tokens=captured[i]))
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def retrieval_profile(model: nn.Module, tasks: Sequence[Task], max_samples: int = 256,
                      seed: int = 0) -> list[list[list[float]]]:
    """Mean retrieval weights per block and domain: [block][task][slot], from each task's test images
    (at most ``max_samples``, a stratified subset drawn with ``seed``)."""
    return [[w.mean(0).tolist() for w in per_task] for per_task in _block_weights(model, tasks, max_samples, seed)]


@torch.no_grad()
def weight_mass(model: nn.Module, tasks: Sequence[Task], max_samples: int = 256, seed: int = 0) -> list[dict]:
    """Per block, from each task's test images (at most ``max_samples``, a stratified subset drawn with
    ``seed``): how large and how input-dependent the weights are.

    ``abs_sum``: mean over images of sum_n |w_n| (1 for a convex mixture; more: adapters added and
    subtracted beyond their trained scale). ``max_abs``: the largest |w_n| of any image.
    ``domain_spread``: the largest difference between two domains' mean weights of a slot (0: the
    block mixes every domain alike, it does not route). An empty memory gives zeros.
    """
    out = []
    for per_task in _block_weights(model, tasks, max_samples, seed):
        allw = torch.cat(per_task)
        if allw.shape[1] == 0:
            out.append({"abs_sum": 0.0, "max_abs": 0.0, "domain_spread": 0.0})
            continue
        means = torch.stack([w.mean(0) for w in per_task])
        out.append({"abs_sum": allw.abs().sum(1).mean().item(), "max_abs": allw.abs().max().item(),
                    "domain_spread": (means.max(0).values - means.min(0).values).max().item()})
    return out
