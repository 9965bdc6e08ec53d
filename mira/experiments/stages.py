"""MIRA's two training stages (method.md section 3) on a timm ViT with MIRA attached.

* :func:`train_adapter_pool`, the **adaptation** stage: for each task and each of ``n`` copies
  (different seeds) a fresh LoRA on Q/V of every block plus a fresh bias-free head, AdamW
  (lr 1e-3, wd 1e-3, batch 128, up to ``max_epochs``, stop early above 99% train accuracy),
  then :func:`mira.write_adapters`. Adapters do not depend on earlier tasks (the backbone is
  frozen and every LoRA starts fresh), so one pool per seed serves every protocol and variant
  that uses those tasks.
* :func:`consolidate`, the **consolidation** stage: adapters frozen; keys, query modules and
  the head trained with cross-entropy; optional class mask (CIL), within-class mixup (DG) and
  DualGPM projection (DIL / CIL).

The model's own ``head`` attribute is the task head (bias-free ``nn.Linear``), trained through
``mira.set_stage(..., extra_trainable=("head",))``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import mira

from .backbone import normalize
from .dualgpm import GradientProjectionMemory, ProjectedParameter

__all__ = [
    "AdapterPool",
    "RecipeConfig",
    "Task",
    "attach_memory_model",
    "consolidate",
    "evaluate",
    "adapter_cross_accuracy",
    "train_adapter_pool",
    "train_lora",
]


@dataclasses.dataclass
class Task:
    """One task: training and test images (B, C, H, W) in [0, 1], global labels, its classes."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[int, ...]


@dataclasses.dataclass
class RecipeConfig:
    """Hyper-parameters of both stages.

    Published (method.md section 3): AdamW, wd 1e-3, rank 4, early stop above 99% train accuracy,
    DualGPM threshold 0.7, mixup Beta(0.4, 0.4). Changed here, measured on this data: the paper's
    batch 128 / lr 1e-3 / <= 5 epochs assumes 10^4-10^5 images (hundreds of steps per epoch);
    with 899 images per domain that is 7 steps per epoch and a fresh head reached only 20-66%
    train accuracy in 5 epochs (rotated 0.79 train after 12 epochs). Batch 32 and lr 3e-3 reach
    0.84 / 0.62 / 0.995 (rotated / noisy / upright) in 4 epochs at similar cost. Not published,
    our choices: ``consolidation_epochs``, ``key_lr``, ``head_lr``, ``gpm_batch``, and the
    number of adapters per task (paper: 10; here 1-2 to fit the CPU budget).
    """

    rank: int = 4
    adapters_per_task: int = 1
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-3
    max_epochs: int = 4
    early_stop_acc: float = 0.99
    consolidation_epochs: int = 3
    key_lr: float = 1e-1
    head_lr: float = 3e-3
    gpm_threshold: float = 0.7
    gpm_batch: int = 128
    mixup_alpha: float = 0.4

    def __post_init__(self):
        if self.adapters_per_task < 1 or self.max_epochs < 1 or self.consolidation_epochs < 0:
            raise ValueError("adapters_per_task and max_epochs must be >= 1, consolidation_epochs >= 0")
        if not 0 < self.gpm_threshold <= 1:
            raise ValueError("gpm_threshold must be in (0, 1]")


def _batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool = True):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def _masked(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    # CIL: classes outside the current task get -inf, so their rows receive no gradient.
    if class_mask is None:
        return logits
    return logits.masked_fill(~class_mask[: logits.shape[1]], float("-inf"))


def _logits(model: nn.Module, x: torch.Tensor, backbone_grad: bool) -> torch.Tensor:
    if backbone_grad:
        return model(normalize(x))
    # Nothing before the head trains: run the backbone without autograd (a large saving).
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(normalize(x)), pre_logits=True)
    return model.head(feats)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (its own head) on images x (n, C, H, W) and labels y (n,)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(normalize(x[i : i + batch_size])).argmax(-1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(x), 1)


def attach_memory_model(backbone: nn.Module, *, rank: int, separation: str = "affine", query: str = "identity",
                        head_rows: int = 10) -> nn.Module:
    """A copy of the frozen backbone with MIRA attached to every block and a bias-free head."""
    model = copy.deepcopy(backbone)
    model.head = nn.Linear(model.embed_dim, head_rows, bias=False)
    mira.attach(model, rank=rank, slices=("q", "v"), query=query, separation=separation)
    return model


def train_lora(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig, gen: torch.Generator, *,
               class_mask: torch.Tensor | None = None, max_epochs: int | None = None, train_head: bool = True) -> dict:
    """Adaptation-stage training of the model's live LoRA and head on (x, y), in place.

    AdamW(lr, wd), batch ``cfg.batch_size``; stops after the first epoch whose running train
    accuracy exceeds ``cfg.early_stop_acc``, else after ``max_epochs``. Returns
    ``{"epochs": ..., "train_acc": ...}``.
    """
    mira.set_stage(model, "adaptation", extra_trainable=("head",) if train_head else ())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    epochs = max_epochs or cfg.max_epochs
    acc = 0.0
    epochs_run = 0
    for _ in range(epochs):
        epochs_run += 1
        correct = 0
        for idx in _batches(len(x), cfg.batch_size, gen):
            logits = _masked(model(normalize(x[idx])), class_mask)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(-1) == y[idx]).sum().item()
        acc = correct / len(x)
        if acc > cfg.early_stop_acc:
            break
    model.eval()
    return {"epochs": epochs_run, "train_acc": acc}


@dataclasses.dataclass
class AdapterPool:
    """Adapters of every task, in the order they were written.

    Attributes:
        bank_a: per block, (T * n, S, r, d_in) stored A factors.
        bank_b: per block, (T * n, S, d_s, r) stored B factors.
        heads: per task, the n adaptation heads (rows = that task's classes, in ``Task.classes`` order).
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
            0..k-1); otherwise every head covers all classes (DIL / DG).
        progress: optional tqdm bar, advanced once per adapter.
        adapters_per_task: overrides ``cfg.adapters_per_task``.
    """
    copies = adapters_per_task or cfg.adapters_per_task
    num_classes = 1 + max(max(t.classes) for t in tasks)
    model = attach_memory_model(backbone, rank=cfg.rank, head_rows=num_classes)
    heads: list[list[torch.Tensor]] = []
    info: list[list[dict]] = []
    slot_task = []
    for t, task in enumerate(tasks):
        heads.append([])
        info.append([])
        y = task.train_y
        if local_labels:
            remap = torch.full((num_classes,), -1, dtype=torch.long)
            remap[list(task.classes)] = torch.arange(len(task.classes))
            y = remap[y]
        rows = len(task.classes) if local_labels else num_classes
        for c in range(copies):
            gen = torch.Generator().manual_seed(10_000 * seed + 100 * t + c)
            for proj in mira.projections(model):
                proj.reset_lora(gen)
            head = nn.Linear(model.embed_dim, rows, bias=False)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * model.embed_dim**-0.5)
            model.head = head
            info[t].append(train_lora(model, task.train_x, y, cfg, gen))
            heads[t].append(model.head.weight.detach().clone())
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
def adapter_cross_accuracy(backbone: nn.Module, pool: AdapterPool, tasks: Sequence[Task], rank: int) -> list:
    """acc[i][j]: test accuracy on task j of task i's first adapter with task i's own adaptation head.

    The diagonal is what perfect routing (one-hot weight on the right adapter, that adapter's own
    head) would give; the off-diagonal shows how specific each adapter + head pair is.
    """
    model = attach_memory_model(backbone, rank=rank, head_rows=pool.heads[0][0].shape[0])
    out = []
    for i in range(len(tasks)):
        slot = int(pool.task_slots(i)[0])
        for proj, a, b in zip(mira.projections(model), pool.bank_a, pool.bank_b):
            proj.lora_a.copy_(a[slot])
            proj.lora_b.copy_(b[slot])
        model.head = nn.Linear(model.embed_dim, pool.heads[i][0].shape[0], bias=False)
        model.head.weight.copy_(pool.heads[i][0])
        mira.set_stage(model, "adaptation")
        out.append([evaluate(model, t.test_x, t.test_y) for t in tasks])
    return out


def append_task_adapters(model: nn.Module, pool: AdapterPool, t: int, keys: Sequence[torch.Tensor]) -> None:
    """Store task ``t``'s adapters in every block's memory with the given (n, d_k) keys per block."""
    slots = pool.task_slots(t)
    for mem, a, b, k in zip(mira.memories(model), pool.bank_a, pool.bank_b, keys):
        mem.append(a[slots], b[slots], k)


def _within_class_mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    # Partner of each sample: a random sample of the same class in the batch (itself if alone).
    partner = torch.arange(len(y))
    for c in y.unique():
        idx = torch.nonzero(y == c).flatten()
        partner[idx] = idx[torch.randperm(len(idx), generator=gen)]
    lam = torch.distributions.Beta(alpha, alpha).sample((len(y),)).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[partner]


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
    """Grow the DualGPM bases from one batch x of the task just learned; returns the new ranks."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    bindings = gpm_modules(model)
    for pp, module, where in bindings:
        def hook(mod, args, output, pp=pp, where=where):
            captured[pp.name] = (output if where == "out" else args[0]).detach()
        handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        model(normalize(x))
    finally:
        for h in handles:
            h.remove()
    for pp, _, _ in bindings:
        if pp.name in captured:
            gpm.update(pp.name, pp.augment(captured[pp.name]))
    return {pp.name: gpm.rank(pp.name) for pp, _, _ in bindings}


def consolidate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecipeConfig, gen: torch.Generator, *,
                train_keys: bool = True, class_mask: torch.Tensor | None = None,
                gpm: GradientProjectionMemory | None = None, mixup: bool = False,
                key_lr: float | None = None, epochs: int | None = None) -> dict:
    """Consolidation stage on (x, y): adapters frozen, keys + query modules (if ``train_keys``) and head train.

    With ``gpm``, every optimiser step is projected: the update of each protected parameter
    (keys, query-module linears, head) is replaced by its component orthogonal to the stored
    basis. The update, not only the gradient, is projected, because Adam's per-coordinate
    scaling and weight decay would otherwise move a projected gradient back into the protected
    space.
    """
    mira.set_stage(model, "consolidation", extra_trainable=("head",))
    head_params = list(model.head.parameters())
    groups = [{"params": head_params, "lr": cfg.head_lr}]
    if train_keys:
        mem_params = mira.trainable_parameters(model, "consolidation")
        groups.append({"params": mem_params, "lr": cfg.key_lr if key_lr is None else key_lr})
    else:
        for p in mira.trainable_parameters(model, "consolidation"):
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    bindings = [pp for pp, _, _ in gpm_modules(model)] if gpm is not None else []
    bindings = [pp for pp in bindings if pp.weight.requires_grad and pp.name in gpm]
    model.train()
    epochs = cfg.consolidation_epochs if epochs is None else epochs
    losses = []
    correct = 0
    for _ in range(epochs):
        correct = 0
        for idx in _batches(len(x), cfg.batch_size, gen):
            xb = _within_class_mixup(x[idx], y[idx], cfg.mixup_alpha, gen) if mixup else x[idx]
            logits = _masked(_logits(model, xb, backbone_grad=train_keys), class_mask)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for pp in bindings:
                pp.project(gpm)
            before = [(pp, pp.weight.detach().clone(), None if pp.bias is None else pp.bias.detach().clone())
                      for pp in bindings]
            opt.step()
            for pp, w0, b0 in before:
                _project_update(pp, w0, b0, gpm)
            losses.append(loss.item())
            correct += (logits.argmax(-1) == y[idx]).sum().item()
    model.eval()
    mira.set_stage(model, "inference")
    tail = losses[-10:]
    return {"final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "last_epoch_train_acc": correct / len(x) if epochs else float("nan")}


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
