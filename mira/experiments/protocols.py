"""The DG / DIL / CIL protocols of method.md section 3, with the baselines run beside MIRA.

Variants (same adapters, same initial random keys, same head initialisation, same data order):

============== ==================================================================================
mira           affine separation, keys (+ query module) and head trained in consolidation
mira_softmax   the same with softmax separation
mira_no_gpm    DIL / CIL: mira with DualGPM switched off (what the projection costs / buys)
random_keys    affine, the random Gaussian keys written at adaptation never trained (query module
               frozen too); only the head trains: what key learning adds
uniform_mean   every stored adapter with weight 1/N (softmax over identical frozen keys, which is
               exactly uniform); only the head trains: the adapters without any retrieval
seq_lora       DIL / CIL: one LoRA + head fine-tuned task after task (adaptation-stage training);
               the forgetting reference
joint_lora     one LoRA + head trained on the union of all tasks (DIL / CIL) or all source
               domains (DG) in one go: the upper reference, no forgetting by construction
============== ==================================================================================

DualGPM projects keys, query modules and head from the second task on for every memory variant
that trains them (DIL / CIL). CIL: growing bias-free head, new rows initialised from the mean of
that task's adaptation heads; old-class logits masked while a task trains (seq_lora too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

import mira

from .data import Domain
from .dualgpm import GradientProjectionMemory
from .metrics import average_accuracy, average_forgetting
from .stages import (
    AdapterPool,
    RecipeConfig,
    Task,
    append_task_adapters,
    attach_memory_model,
    consolidate,
    evaluate,
    gpm_update,
    train_lora,
)

__all__ = [
    "CL_VARIANTS",
    "DG_VARIANTS",
    "ProtocolConfig",
    "cil_tasks",
    "dil_tasks",
    "run_continual",
    "run_dg_fold",
    "query_geometry",
    "retrieval_profile",
]

MEMORY_VARIANTS = ("mira", "mira_softmax", "random_keys", "uniform_mean")
CL_VARIANTS = (*MEMORY_VARIANTS, "mira_no_gpm", "seq_lora", "joint_lora")
DG_VARIANTS = (*MEMORY_VARIANTS, "joint_lora")


@dataclasses.dataclass
class ProtocolConfig:
    """Protocol-level settings; ``recipe`` holds the stage hyper-parameters."""

    recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)
    joint_epochs: int = 2
    dg_consolidation_epochs: int = 1
    cil_adapters_per_task: int = 2
    dg_mixup: bool = True
    gpm: bool = True
    cil_classes_per_task: int = 2


def dil_tasks(domains: Sequence[Domain]) -> list[Task]:
    """DIL: one task per domain, every task has all 10 classes."""
    return [Task(d.name, d.train_x, d.train_y, d.test_x, d.test_y, tuple(range(10))) for d in domains]


def cil_tasks(domains: Sequence[Domain], classes_per_task: int = 2) -> list[Task]:
    """CIL: tasks are disjoint class groups (0-1, 2-3, ...), images pooled from every domain."""
    x_tr = torch.cat([d.train_x for d in domains])
    y_tr = torch.cat([d.train_y for d in domains])
    x_te = torch.cat([d.test_x for d in domains])
    y_te = torch.cat([d.test_y for d in domains])
    tasks = []
    for start in range(0, 10, classes_per_task):
        cls = tuple(range(start, min(start + classes_per_task, 10)))
        tr = torch.isin(y_tr, torch.tensor(cls))
        te = torch.isin(y_te, torch.tensor(cls))
        tasks.append(Task(f"classes {cls[0]}-{cls[-1]}", x_tr[tr], y_tr[tr], x_te[te], y_te[te], cls))
    return tasks


def _separation(variant: str) -> str:
    return "softmax" if variant in ("mira_softmax", "uniform_mean") else "affine"


def _task_keys(variant: str, model: nn.Module, n: int, seed: int, t: int) -> list[torch.Tensor]:
    """Keys for task t's n adapters in each block: the same Gaussian draw for every variant
    (so random_keys is exactly mira's starting point), identical constant keys for uniform_mean."""
    keys = []
    for block, mem in enumerate(mira.memories(model)):
        d_k = mem.config.d_k
        if variant == "uniform_mean":
            keys.append(torch.ones(n, d_k))
        else:
            gen = torch.Generator().manual_seed(1_000_003 * seed + 1009 * t + block)
            keys.append(torch.randn(n, d_k, generator=gen))
    return keys


def _head_init(pool: AdapterPool, t: int) -> torch.Tensor:
    return torch.stack(pool.heads[t]).mean(0)


def _lora_model(backbone: nn.Module, rank: int, rows: int, gen: torch.Generator) -> nn.Module:
    model = attach_memory_model(backbone, rank=rank, head_rows=rows)
    for proj in mira.projections(model):
        proj.reset_lora(gen)
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


def run_continual(setting: str, variant: str, backbone: nn.Module, tasks: Sequence[Task], pool: AdapterPool | None,
                  cfg: ProtocolConfig, seed: int, *, step: Callable[[], None] | None = None,
                  keep_model: bool = False) -> dict:
    """DIL or CIL run of one variant. Returns the accuracy matrix, average accuracy and forgetting.

    ``acc[i][j]``: accuracy on task j's test set after task i (nan above the diagonal).
    """
    if setting not in ("dil", "cil"):
        raise ValueError(f"setting must be 'dil' or 'cil', got {setting!r}")
    if variant not in CL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {CL_VARIANTS}")
    rc = cfg.recipe
    gen = torch.Generator().manual_seed(7919 * seed + 17)
    torch.manual_seed(seed)
    cil = setting == "cil"
    num_classes = 10
    nt = len(tasks)
    out: dict = {"variant": variant, "seed": seed}

    if variant == "joint_lora":
        model = _lora_model(backbone, rc.rank, num_classes, gen)
        x = torch.cat([t.train_x for t in tasks])
        y = torch.cat([t.train_y for t in tasks])
        out["train"] = train_lora(model, x, y, rc, gen, max_epochs=cfg.joint_epochs)
        final = [evaluate(model, t.test_x, t.test_y) for t in tasks]
        out.update(final_row=final, avg_acc=sum(final) / nt, forgetting=None)
        if step:
            step()
        return out

    acc = [[float("nan")] * nt for _ in range(nt)]
    gpm = None
    if variant in MEMORY_VARIANTS:
        gpm = GradientProjectionMemory(rc.gpm_threshold, enabled=cfg.gpm)
    if variant == "seq_lora":
        model = _lora_model(backbone, rc.rank, len(tasks[0].classes) if cil else num_classes, gen)
    else:
        model = attach_memory_model(backbone, rank=rc.rank, separation=_separation(variant), query="identity",
                                    head_rows=len(tasks[0].classes) if cil else num_classes)
        with torch.no_grad():
            init = _head_init(pool, 0)
            model.head.weight.copy_(init)
    ranks = []
    for t, task in enumerate(tasks):
        seen = 1 + max(task.classes)
        mask = _class_mask(task, num_classes) if cil else None
        if variant == "seq_lora":
            if cil and t > 0:
                _grow_head(model, seen, None, gen)
            train_lora(model, task.train_x, task.train_y, rc, gen, class_mask=mask)
        else:
            n = len(pool.task_slots(t))
            append_task_adapters(model, pool, t, _task_keys(variant, model, n, seed, t))
            if cil and t > 0:
                rows = {c: w for c, w in zip(task.classes, _head_init(pool, t))}
                _grow_head(model, seen, rows, gen)
            train_keys = variant in ("mira", "mira_softmax", "mira_no_gpm")
            out.setdefault("consolidation", []).append(
                consolidate(model, task.train_x, task.train_y, rc, gen, train_keys=train_keys, class_mask=mask,
                            gpm=gpm if t > 0 else None))
            if gpm is not None and gpm.enabled:
                idx = torch.randperm(len(task.train_x), generator=gen)[: rc.gpm_batch]
                ranks.append(gpm_update(model, gpm, task.train_x[idx]))
        for j in range(t + 1):
            acc[t][j] = evaluate(model, tasks[j].test_x, tasks[j].test_y)
        if step:
            step()
    out.update(acc=acc, avg_acc=average_accuracy(acc), forgetting=average_forgetting(acc), final_row=acc[-1])
    if ranks:
        out["gpm_ranks"] = ranks
    if keep_model:
        out["model"] = model
    return out


def run_dg_fold(variant: str, backbone: nn.Module, domains_tasks: Sequence[Task], held_out: int,
                pool: AdapterPool, cfg: ProtocolConfig, seed: int, *, keep_model: bool = False) -> dict:
    """Leave-one-domain-out: train on every other domain, report accuracy on the held-out test set."""
    if variant not in DG_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {DG_VARIANTS}")
    rc = cfg.recipe
    gen = torch.Generator().manual_seed(7919 * seed + 31 * held_out + 5)
    torch.manual_seed(seed)
    sources = [i for i in range(len(domains_tasks)) if i != held_out]
    x = torch.cat([domains_tasks[i].train_x for i in sources])
    y = torch.cat([domains_tasks[i].train_y for i in sources])
    target = domains_tasks[held_out]
    out: dict = {"variant": variant, "seed": seed, "held_out": target.name}
    if variant == "joint_lora":
        model = _lora_model(backbone, rc.rank, 10, gen)
        out["train"] = train_lora(model, x, y, rc, gen, max_epochs=cfg.joint_epochs)
    else:
        model = attach_memory_model(backbone, rank=rc.rank, separation=_separation(variant), query="mlp",
                                    head_rows=10)
        for t in sources:
            append_task_adapters(model, pool, t, _task_keys(variant, model, len(pool.task_slots(t)), seed, t))
        with torch.no_grad():
            model.head.weight.copy_(torch.stack([_head_init(pool, t) for t in sources]).mean(0))
        out["train"] = consolidate(model, x, y, rc, gen, train_keys=variant in ("mira", "mira_softmax"),
                                   mixup=cfg.dg_mixup, epochs=cfg.dg_consolidation_epochs)
    out["held_out_acc"] = evaluate(model, target.test_x, target.test_y)
    if keep_model:
        out["model"] = model
    return out


@torch.no_grad()
def query_geometry(model: nn.Module, tasks: Sequence[Task], max_samples: int = 256) -> list[dict]:
    """Per block: how far apart the tasks' queries are (why retrieval can or cannot route).

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
        for task in tasks:
            model(normalize(task.test_x[:max_samples]))
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


@torch.no_grad()
def retrieval_profile(model: nn.Module, tasks: Sequence[Task], max_samples: int = 256) -> list[list[list[float]]]:
    """Mean retrieval weights per block and domain: [block][task][slot], from each task's test images."""
    from .backbone import normalize

    projs = mira.projections(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0]))
               for i, p in enumerate(projs)]
    prof = [[] for _ in projs]
    model.eval()
    try:
        for task in tasks:
            model(normalize(task.test_x[:max_samples]))
            for i, p in enumerate(projs):
                w = p.memory.get_association_matrix(tokens=captured[i])
                prof[i].append(w.mean(0).tolist())
    finally:
        for h in handles:
            h.remove()
    return prof

