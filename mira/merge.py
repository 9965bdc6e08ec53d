"""Merge and fold: a fixed update moved into the frozen qkv weight, so serving runs the plain backbone.

Two kinds of fixed update, both ``W[slice_s] += scale * B_s A_s`` on every adapted slice s:

* **merge**: the live adaptation LoRA (``lora_a``, ``lora_b``), what the ``adaptation`` stage
  runs. As PEFT's ``merge_adapter``.
* **fold**: a fixed mixture of the memory. Given per-block slot weights w (N,), the mixed
  factors are ``A = sum_n w_n bank_a[n]`` and ``B = sum_n w_n bank_b[n]``: exactly the layer's
  update for a sample whose retrieval weights are w. The weights are given by the caller, or
  calibrated by :func:`mean_retrieval_weights` as the mean of each block's retrieval weights
  over a calibration set. That is **the mean of the weights, not of the updates**: the update
  is bilinear in w (A and B are both mixed), so the folded model equals the per-sample model
  only for samples whose weights are the mean (for instance, a calibration set of one image);
  elsewhere it is an approximation whose quality the caller measures.

While an update is held, each :class:`~mira.layers.MiraProjection` runs its base layer alone,
in every stage: no MIRA op and no memory read, so under ``torch.compile`` and ``torch.export``
the graph is the backbone's, and in eager the only cost left is the wrapper's module call
(:func:`unload` removes even that). Stage switches are refused while an update is held.

:func:`unmerge` / :func:`unfold` subtract the recorded factors (recorded at merge / fold time,
so later changes to the LoRA or the memory do not matter). Each step is computed in float64
and rounded once into the weight's dtype, so the restored weight is the original to rounding
(within one unit in the last place of ``max(|W|, |W + D|)``), not bit for bit: keep a copy of
the state dict if you need the bits. A state dict taken while an update is held has it in the
weights; save before merging, or unmerge first. Loading a state dict that holds a held base
weight is refused until the update is taken out: before anything loads when the call begins at
the model given to merge / fold or attach, or below it; a call begun above both (a wrapper made
later) has loaded what comes before them by then, and its message says what.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .integration import (
    _load_call,
    _qkv_blocks,
    _refuse_held_update,
    _what_loaded,
    association_matrices,
    detach,
    named_memories,
    projections,
)
from .layers import MiraProjection

__all__ = ["MergedUpdate", "fold", "mean_retrieval_weights", "merge", "unfold", "unload", "unmerge"]


@dataclass
class MergedUpdate:
    """The update a projection holds in its weight: ``scale * factor_b[s] @ factor_a[s]`` per slice.

    Attributes:
        kind: ``"merged"`` (the live LoRA) or ``"folded"`` (a mixture of the memory).
        factor_a: (S, r, d_in) float64.
        factor_b: (S, d_s, r) float64.
        slot_weights: (N,) float64 slot weights of a fold, else None.
    """

    kind: str
    factor_a: torch.Tensor
    factor_b: torch.Tensor
    slot_weights: torch.Tensor | None = None


def _require_projections(model: nn.Module, what: str) -> list[MiraProjection]:
    projs = projections(model)
    if not projs:
        raise RuntimeError(f"{what}: the model has no MIRA layers (call mira.attach first)")
    return projs


@torch.no_grad()
def _updated_weight(proj: MiraProjection, update: MergedUpdate, sign: float, what: str) -> torch.Tensor:
    """``W + sign * scale * B A`` on every slice, in float64 rounded once to W's dtype; W unchanged.

    Raises if the result holds inf or NaN where W was finite (a huge update would overflow the
    weight's dtype: refused, never created).
    """
    if "weight" not in proj.base_layer._parameters:
        # torch.nn.utils.prune and parametrize make the weight a tensor recomputed from other ones at
        # every forward: an update written into it would be gone at the next call (a merge that does
        # nothing, an unmerge that subtracts from a copy), so the weight must be a parameter again first.
        # A quantized layer (torch.ao quantize_dynamic) holds packed integers: merge before quantizing.
        raise RuntimeError(f"{what}: a qkv base layer's weight is not a parameter (recomputed at every forward by "
                           "torch.nn.utils.prune or parametrize, or packed by quantization), so an update cannot be "
                           "written into it; make it a plain parameter first (prune.remove / "
                           "parametrize.remove_parametrizations), or merge / fold before quantizing; nothing was "
                           "changed")
    weight = proj.base_layer.weight
    d_s = proj.memory.config.slice_width
    scale = proj.memory.config.scale
    factor_a = update.factor_a.to(weight.device)
    factor_b = update.factor_b.to(weight.device)
    new = weight.detach().clone()
    for s, off in enumerate(proj.slice_offsets):
        rows = new[off: off + d_s]
        delta = scale * (factor_b[s] @ factor_a[s])  # (d_s, d_in), float64
        rows.copy_((rows.to(torch.float64) + sign * delta).to(weight.dtype))
    created = ~torch.isfinite(new) & torch.isfinite(weight)
    if bool(created.any()):
        raise ValueError(f"{what}: the update would make {int(created.sum())} finite qkv weights inf or NaN "
                         f"(too large for {weight.dtype}); nothing was changed")
    return new


_UNDO = {"merged": "unmerge", "folded": "unfold"}


def _apply(projs: list[MiraProjection], updates: list[MergedUpdate | None], sign: float, what: str) -> None:
    """Every projection's new weight computed and checked first, then all written: all or nothing."""
    new = [_updated_weight(p, u, sign, what) for p, u in zip(projs, updates)]
    with torch.no_grad():
        for proj, update, weight in zip(projs, updates, new):
            proj.base_layer.weight.copy_(weight)
            proj.merged_update = update if sign > 0 else None


def _refuse_load_while_held(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a module holding, or above, a projection that holds an update.

    A state dict with that projection's base weight would overwrite the weight that holds the
    update (the record merged_update would then describe a weight no longer there: unmerge
    subtracting it again). nn.Module.load_state_dict loads module by module, parents first: the
    projection's own refusal (MiraProjection._load_from_state_dict) comes after every module before
    it has loaded, memories, LoRA and head. This runs before the module it is registered on loads
    anything, so a call begun there (or below it) raises with the model unchanged. One begun above it
    (merge given ``model.blocks``, a wrapper made after the fold) has loaded the modules before it by
    then: the message says which (torch has no hook that runs before a call loads anything), and
    that loading from the model itself, or merging / folding the outermost model, refuses first.
    Also called by attach's check of a whole load (mira.integration._refuse_failing_load).
    """
    for name, sub in module.named_modules():
        held = sub.merged_update if isinstance(sub, MiraProjection) else None
        base = f"{prefix}{name}.base_layer." if name else f"{prefix}base_layer."
        if held is not None and any(key.startswith(base) for key in state_dict):
            where = base[: -len(".base_layer.")] or "the projection"
            copied = _load_call(module, state_dict, prefix)[3]
            verb = {"merged": "merge", "folded": "fold"}[held.kind]
            advice = "" if copied == [] else (f"; to be refused before anything loads, load from the module "
                                              f"mira.{verb} was given, or {verb} the outermost model")
            raise RuntimeError(f"load_state_dict: {where} holds a {held.kind} update in its base weight, which the "
                               f"state dict would overwrite; {_what_loaded(copied, prefix)}: call "
                               f"mira.{_UNDO[held.kind]}(model) first{advice}")


def _refuse_load_into_held_base(kind: str, module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of the base layer of a projection that holds a ``kind`` update (the
    base layer cannot see its projection: a load started on it directly would overwrite the update)."""
    if any(key.startswith(prefix) for key in state_dict):
        raise RuntimeError(f"load_state_dict: this layer is the base layer of a MIRA projection that holds a {kind} "
                           "update in its weight, which the state dict would overwrite; nothing was loaded: call "
                           f"mira.{_UNDO[kind]}(model) first")


def _is_refusal(hook) -> bool:
    hook = getattr(hook, "hook", hook)  # torch wraps it (_WrappedHook)
    return hook is _refuse_load_while_held or getattr(hook, "func", None) is _refuse_load_into_held_base


def _register_once(module: nn.Module, hook) -> None:
    if not any(_is_refusal(h) for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(hook)


def _guard_loads(model: nn.Module) -> None:
    """Register the refusal on every module on the path from ``model`` to each projection that holds an
    update, both ends included, and on that projection's base layer: a load_state_dict started on any
    of them refuses before it loads.

    Registered here (not at attach) and removed by :func:`_unguard_loads`: a model holding no update
    keeps the hooks attach left. The hooks are module-level functions (a partial of one) given their
    module by torch, so a deep copy or a pickled model refuses for itself.
    """
    for name, sub in model.named_modules():
        if not (isinstance(sub, MiraProjection) and sub.merged_update is not None):
            continue
        parts = name.split(".") if name else []
        for depth in range(len(parts) + 1):
            _register_once(model.get_submodule(".".join(parts[:depth])), _refuse_load_while_held)
        _register_once(sub.base_layer, functools.partial(_refuse_load_into_held_base, sub.merged_update.kind))


def _unguard_loads(model: nn.Module) -> None:
    """Remove the refusals from every module of ``model`` that no longer holds an update below it."""
    held = [m for m in model.modules() if isinstance(m, MiraProjection) and m.merged_update is not None]
    keep = {id(p) for p in held} | {id(p.base_layer) for p in held}
    for module in model.modules():
        if any(id(m) in keep for m in module.modules()):  # it holds, or is above, a projection still holding
            continue
        hooks = module._load_state_dict_pre_hooks
        for key in [key for key, hook in hooks.items() if _is_refusal(hook)]:
            del hooks[key]


def _hold(model: nn.Module, projs: list[MiraProjection], updates: list[MergedUpdate], what: str) -> None:
    held = [p for p in projs if p.merged_update is not None]
    if held:
        kind = held[0].merged_update.kind
        raise RuntimeError(f"the model already holds a {kind} update; call mira.{_UNDO[kind]}(model) first")
    _apply(projs, updates, +1.0, what)
    _guard_loads(model)


def _release(model: nn.Module, kind: str) -> nn.Module:
    what = _UNDO[kind]
    projs = _require_projections(model, what)
    wrong = {p.merged_update.kind for p in projs if p.merged_update is not None} - {kind}
    if wrong:
        raise RuntimeError(f"{what}: the model holds a {wrong.pop()} update, not a {kind} one")
    holding = [p for p in projs if p.merged_update is not None]
    if not holding:
        raise RuntimeError(f"{what}: the model holds no {kind} update")
    _apply(holding, [p.merged_update for p in holding], -1.0, what)
    _unguard_loads(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Add every projection's live adaptation LoRA into its frozen qkv weight (in place).

    The model must be in the ``adaptation`` stage (the stage that runs the live LoRA); its
    outputs are unchanged to rounding, and the projections then run the plain linear layer.

    Returns:
        ``model``.
    """
    projs = _require_projections(model, "merge")
    stages = {p.stage for p in projs}
    if stages != {"adaptation"}:
        raise RuntimeError(
            f"merge adds the live LoRA, which only the adaptation stage runs, but the model is in {sorted(stages)}; "
            "to serve the memory with fixed slot weights, use mira.fold"
        )
    updates = [MergedUpdate("merged", p.lora_a.detach().to(torch.float64).clone(),
                            p.lora_b.detach().to(torch.float64).clone()) for p in projs]
    _hold(model, projs, updates, "merge")
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the merged LoRA from the weights (restored to rounding); the LoRA runs again."""
    return _release(model, "merged")


def _slot_weights(model: nn.Module, weights) -> list[torch.Tensor]:
    """One checked float64 (N,) tensor per memory, in block order."""
    named = named_memories(model)
    if not isinstance(weights, (torch.Tensor, Mapping)) and getattr(weights, "ndim", None) == 1:
        weights = _as_tensor(weights, "every memory")  # a 1-D numpy array (a calibration computed in numpy)
    if isinstance(weights, Mapping):
        names = [n for n, _ in named]
        unknown = sorted(set(weights) - set(names))
        missing = [n for n in names if n not in weights]
        if unknown or missing:
            raise KeyError(f"fold: slot weights for memories the model does not have: {unknown}; "
                           f"memories without slot weights: {missing}")
        per_memory = [weights[n] for n in names]
    elif isinstance(weights, torch.Tensor) and weights.dim() <= 1 or isinstance(weights, Sequence) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):  # [True, False] is no weighting
        per_memory = [weights] * len(named)
    elif isinstance(weights, Sequence) and not isinstance(weights, str) and len(weights) == len(named) and all(
            isinstance(w, (torch.Tensor, Sequence)) or getattr(w, "ndim", None) is not None for w in weights):
        per_memory = list(weights)  # tensors, lists or numpy arrays; each one's shape is checked below
    else:
        raise TypeError(
            "fold: weights must be {memory name: (N,) weights} (as mean_retrieval_weights returns), a sequence "
            f"with one (N,) tensor per memory ({len(named)} here), or one (N,) tensor for every memory; got "
            f"{type(weights).__name__}"
        )
    checked = []
    for (name, memory), w in zip(named, per_memory):
        w = _as_tensor(w, name).detach().to("cpu", torch.float64)
        n = memory.num_slots
        if w.shape != (n,):
            raise ValueError(f"fold: {name} holds {n} adapters, so its slot weights must have shape ({n},), "
                             f"got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"fold: the slot weights of {name} are not all finite: {w.tolist()}")
        checked.append(w)
    return checked


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                   torch.uint64)


def _as_tensor(weights, name: str) -> torch.Tensor:
    """Slot weights as a tensor of real numbers: refused when they are flags (True is no weight of 1),
    complex (the imaginary part would be dropped) or not numbers at all."""
    if isinstance(weights, Sequence) and any(isinstance(w, bool) for w in weights):
        raise TypeError(f"fold: the slot weights of {name} must be real numbers, got the flags {list(weights)}")
    try:
        w = torch.as_tensor(weights)
    except (TypeError, ValueError, RuntimeError) as err:  # str: "new(): invalid data type 'str'"
        raise TypeError(f"fold: the slot weights of {name} must be real numbers, got {type(weights).__name__} "
                        f"{weights!r} ({err})") from None
    if not (w.is_floating_point() or w.dtype in _INTEGER_DTYPES):  # bool, complex, quantized
        raise TypeError(f"fold: the slot weights of {name} must be real numbers (a floating-point or integer "
                        f"tensor), got dtype {w.dtype}")
    return w


def fold(model: nn.Module, weights) -> nn.Module:
    """Fold a fixed mixture of each memory into its projection's weight (in place).

    Args:
        weights: per-block slot weights w (num_slots,): ``{memory name: w}`` (as
            :func:`mean_retrieval_weights` returns), a sequence of one w per memory in block
            order, or one w for every memory.

    Every sample then gets the update the memory gives for weights w: ``A = sum_n w_n
    bank_a[n]``, ``B = sum_n w_n bank_b[n]``, ``W[slice] += scale * B A``. The stage is kept
    (it does not matter while folded) and restored with the weights by :func:`unfold`.

    Returns:
        ``model``.
    """
    projs = _require_projections(model, "fold")
    per_memory = dict(zip((id(m) for _, m in named_memories(model)), _slot_weights(model, weights)))
    updates = []
    for proj in projs:
        w = per_memory[id(proj.memory)]
        bank_a, bank_b = proj.memory.stored_adapters
        w = w.to(bank_a.device)
        factor_a = torch.einsum("n,nsrd->srd", w, bank_a.detach().to(torch.float64))
        factor_b = torch.einsum("n,nser->ser", w, bank_b.detach().to(torch.float64))
        updates.append(MergedUpdate("folded", factor_a, factor_b, w.clone()))
    _hold(model, projs, updates, "fold")
    return model


def unfold(model: nn.Module) -> nn.Module:
    """Subtract the folded mixture from the weights (restored to rounding); the memory runs again."""
    return _release(model, "folded")


def unload(model: nn.Module) -> nn.Module:
    """Remove MIRA and keep the merged or folded updates in the weights: a plain timm model.

    Like PEFT's ``unload`` after a merge: each ``attn.qkv`` becomes its base ``nn.Linear``
    (holding the update, if one was merged or folded), the memories are deleted. Not reversible.
    Unlike PEFT's ``merge_and_unload`` it merges nothing itself: call :func:`mira.merge` (the live
    LoRA) or :func:`mira.fold` (the memory) first, or the adapters are dropped.

    ``model`` may be a part of the model that holds whole blocks (``model.blocks``, one block): the
    projections are replaced where :func:`mira.detach` finds them, as a block's ``attn.qkv``. One
    below ``model`` that would stay (``model`` is an attention module or a projection) is refused,
    with nothing changed: its record of the update would be lost while the update stays in its weight.
    """
    projs = _require_projections(model, "unload")
    replaced = {id(block.attn.qkv) for _, block in _qkv_blocks(model)}  # what detach replaces
    kept = [name or f"the {type(model).__name__} given" for name, sub in model.named_modules()
            if isinstance(sub, MiraProjection) and id(sub) not in replaced]
    if kept:
        # Cleared and left in place, such a projection would run its memory on top of the update in its
        # weight, and unfold could no longer take that update out.
        raise RuntimeError(f"unload: the MIRA projections {kept} would stay, since unload replaces the attn.qkv of "
                           f"each block it is given or holds, not a projection or an attention module on its own; "
                           f"pass the block that holds them (or the whole model); nothing was changed")
    for proj in projs:
        proj.merged_update = None
    _unguard_loads(model)  # the update is now the plain model's weight, which loads as any
    return detach(model)


def _inputs_of(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (inputs, targets, ...) as data loaders yield
    raise TypeError(f"calibration batches must be input tensors or (inputs, ...) tuples, got {type(batch).__name__}")


@torch.no_grad()
def mean_retrieval_weights(model: nn.Module, batches: Iterable, *, progress: bool | None = None
                           ) -> dict[str, torch.Tensor]:
    """Mean retrieval weights of each memory over a calibration set, for :func:`fold`.

    Runs the model with the memory (the inference path, whatever the stage; eval mode) on every
    batch and averages each block's association matrix over all samples. The mean of the
    weights, not of the updates (see the module docstring).

    Args:
        batches: an iterable of input tensors, or of ``(inputs, ...)`` tuples (a data loader);
            a single input tensor is one batch.
        progress: show a progress bar (tqdm); None shows one when writing to a terminal.

    Returns:
        ``{memory name: (num_slots,) float64 mean weights}``.
    """
    from tqdm.auto import tqdm

    if isinstance(batches, torch.Tensor):
        # Iterating a tensor yields single images (C, H, W): take it as one batch instead of failing
        # on the first image's shape.
        batches = [batches]
    elif not isinstance(batches, Iterable) and not hasattr(batches, "__getitem__"):  # None: "not iterable"
        raise TypeError(f"mean_retrieval_weights: batches must be an iterable of input batches (a data loader, a "
                        f"list of tensors) or one input tensor, got {type(batches).__name__}")
    projs = _require_projections(model, "mean_retrieval_weights")
    _refuse_held_update(projs, "mean_retrieval_weights")
    device = next(model.parameters()).device
    stages = [p.stage for p in projs]
    modes = [(m, m.training) for m in model.modules()]  # each module's own: a model may mix them
    totals: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for p in projs:
            p.set_stage("inference")
        model.eval()
        for batch in tqdm(batches, desc="calibrating fold weights", disable=None if progress is None else not progress):
            inputs = _inputs_of(batch).to(device)
            for name, w in association_matrices(model, inputs).items():
                part = w.to(torch.float64).sum(0)
                totals[name] = totals[name] + part if name in totals else part
            count += inputs.shape[0]
    finally:
        for p, stage in zip(projs, stages):
            p.set_stage(stage)
        for m, training in modes:
            m.training = training
    if count == 0:
        raise ValueError("mean_retrieval_weights: the calibration set is empty")
    return {name: total / count for name, total in totals.items()}
