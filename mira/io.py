"""Saving and loading memories and whole models, and importing LoRA adapters saved by PEFT.

File format (``safetensors``; format version :data:`FORMAT_VERSION`): for every memory, named
by its qualified module name (``blocks.3.mira_memory``), the tensors ``<name>.keys``
(N, d_k), ``<name>.bank_a`` (N, S, r, d_in), ``<name>.bank_b`` (N, S, d_s, r) and
``<name>.query_module.<param>``, holding only the N stored adapters (not empty slots). The
metadata holds ``format = "mira-memories"``, ``format_version`` and ``memories``: a JSON object
mapping each name to its config (:class:`~mira.config.MemoryConfig`), slot count, slice
offsets and (version 2) ``slot_names``. Backbone weights are not in the file.

Version 2 (this version writes it; versions 1 and 2 load) adds:

* ``slot_names`` per memory: the task name of each slot (None where unnamed);
* ``attach_config``: the :class:`~mira.config.MiraConfig` that attaches the same layers
  (:func:`mira.config_of`), so :func:`load_model` needs nothing but a fresh backbone;
* ``modules`` and tensors ``modules/<module>.<key>``: the state of modules trained beside MIRA
  (the head), written by :func:`save_model`.

A version-1 file loads with :func:`load_memories` (its slots unnamed); :func:`load_model` refuses
it with the way to load it, since it holds neither the attach config nor the head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .config import STAGES, MemoryConfig, MiraConfig
from .integration import (
    MEMORY_ATTR,
    _check_module,
    _memory_owner,
    _mira_part_owner,
    _qkv_blocks,
    _restored_on_error,
    attach,
    config_of,
    detach,
    named_memories,
    projections,
    set_stage,
)
from .layers import MiraProjection
from .memory import AdapterMemory, zero_key_rows

__all__ = ["FORMAT", "FORMAT_VERSION", "import_peft", "load_memories", "load_model", "save_memories", "save_model"]

FORMAT = "mira-memories"
FORMAT_VERSION = 2
#: Prefix of the tensors of modules saved beside the memories (``modules/head.weight``);
#: module names never contain "/", so they cannot collide with a memory's tensors.
MODULE_PREFIX = "modules/"
_RESERVED = ("format", "format_version", "memories", "attach_config", "modules")

# Config fields that change what a stored adapter means or how it is read; capacity and
# trainable_bank are storage choices and may differ between the file and the model; so is
# bank_dtype (the banks load converted to the model's: exact from 16 bits up, rounded down to them).
_MUST_MATCH = ("d_in", "d_k", "num_slices", "slice_width", "rank", "query", "query_hidden", "query_token",
               "num_prefix_tokens", "separation", "key_norm", "scale", "eps")


def _projection_of(model: nn.Module) -> dict[int, object]:
    return {id(p.memory): p for p in projections(model)}


def save_memories(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write every memory of ``model`` (keys, stored adapters, slot names, query modules, config) to ``path``.

    The memories only: not the backbone weights, nor what the projections hold outside their memories,
    as :func:`save_model` lists (a live LoRA, a merged or folded update), of which it warns the same way.

    Args:
        metadata: extra string entries for the file's metadata (the format's own keys are reserved).
    """
    _write_file(model, path, {}, metadata, "save_memories")


def save_model(model: nn.Module, path: str | os.PathLike, *, modules: Sequence[str] | None = None,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write what a trained MIRA model adds to its backbone, in one safetensors file.

    The memories (keys, stored adapters, slot names, query modules), the state of ``modules``
    (the trained head) and the attach config: :func:`load_model` rebuilds the model from a fresh
    backbone with the same pretrained weights in one call.

    Not in the file, so a loaded model lacks them:

    * the backbone weights, and with them an update :func:`mira.merge` or :func:`mira.fold` holds in a
      projection's base weight: the loaded model runs its memories per sample (or its fresh LoRA), not
      the merged or folded update. Save the unfolded model (:func:`mira.unfold`; a merged LoRA:
      :func:`mira.unmerge`, then :func:`mira.write_adapters`), and keep a fold's slot weights (each
      projection's ``merged_update.slot_weights``) yourself to fold again after loading;
    * the live adaptation LoRA of each projection (``lora_a`` / ``lora_b``, e.g. trained in the
      ``adaptation`` stage, or set by :func:`import_peft`): :func:`load_model` gives fresh ones (B
      zero). Store it in the memory first with :func:`mira.write_adapters`;
    * modules not named in ``modules``, the stage and train / eval mode (:func:`load_model` sets them),
      optimiser state.

    A model holding a live LoRA that is not in its memory, or a merged or folded update, is saved
    with one warning that counts those projections and names the cure.

    Args:
        modules: qualified names of modules trained beside MIRA, outside its layers; default
            the model's classifiers as timm names them (``pretrained_cfg["classifier"]``: ``head``,
            and ``head_dist`` for a distilled DeiT), else ``("head",)`` when it has a ``head``.
        metadata: extra string entries for the file's metadata (the format's own keys are reserved).
    """
    available = dict(model.named_modules())
    if isinstance(modules, str):
        raise TypeError(f"save_model: modules takes a sequence of module names, e.g. ({modules!r},), not the "
                        f"string {modules!r}")
    if modules is None:
        modules = _default_modules(model, available)
    chosen = {}
    for name in modules:
        module = available.get(name)
        if module is None or not name:
            raise KeyError(f"save_model: the model has no module named {name!r}")
        if any(isinstance(m, (AdapterMemory, MiraProjection)) for m in module.modules()):
            raise ValueError(f"save_model: {name!r} contains MIRA layers, which are saved anyway; name modules "
                             "outside them (e.g. 'head')")
        owner = _mira_part_owner(available, name)
        if owner is not None:  # a memory's query module (saved with it) or a projection's frozen base layer
            raise ValueError(f"save_model: {name!r} is part of the MIRA layer {owner!r}, which the file holds as "
                             "MIRA's (query modules) or not at all (a base projection is backbone); name modules "
                             "outside the MIRA layers (e.g. 'head')")
        chosen[name] = module
    _write_file(model, path, chosen, metadata, "save_model")


def _default_modules(model: nn.Module, available: Mapping[str, nn.Module]) -> tuple[str, ...]:
    # Every classifier, not only "head": a distilled DeiT averages head and head_dist, so a file
    # without head_dist would load into a model whose head_dist is the fresh backbone's random one.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(name for name in names if name in available)


def _write_file(model: nn.Module, path, modules: Mapping[str, nn.Module], metadata, what: str) -> None:
    from safetensors.torch import save_file

    named = named_memories(model)
    if not named:
        raise RuntimeError(f"{what}: the model has no MIRA memories (call mira.attach first)")
    path = os.fsdecode(path)  # bytes paths too (f-strings would write "b'...'")
    folder = os.path.dirname(os.path.abspath(path))
    # safetensors' own errors name its temporary file (path.partial-<pid>), not the path asked for.
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: cannot write {path}: it is a directory; give a file path, e.g. "
                                f"{os.path.join(path, 'model.safetensors' if modules else 'memories.safetensors')}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: cannot write {path}: the folder {folder} does not exist")
    meta = _checked_metadata(metadata, what)
    try:
        attach_config = json.dumps(_portable(dataclasses.asdict(config_of(model))))
    except (ValueError, RuntimeError):  # RuntimeError: memories in no timm-style attn.qkv (installed by hand)
        if modules:
            raise
        attach_config = None  # blocks attached by hand (other options, or other places): memories only
    owners = _projection_of(model)
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, memory in named:
        n = memory.num_slots
        bank_a, bank_b = memory.stored_adapters
        # Clones: safetensors refuses views that share storage, and only the stored slots are written.
        tensors[f"{name}.keys"] = memory.stored_keys.detach().clone()
        tensors[f"{name}.bank_a"] = bank_a.detach().clone()
        tensors[f"{name}.bank_b"] = bank_b.detach().clone()
        for key, value in memory.query_module.state_dict().items():
            tensors[f"{name}.query_module.{key}"] = value.detach().clone()
        proj = owners.get(id(memory))
        described[name] = {
            "config": _portable(memory.config.to_dict()),
            "num_slots": n,
            "slice_offsets": list(proj.slice_offsets) if proj is not None else None,
            "slot_names": list(memory.slot_names),
        }
    for module_name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{MODULE_PREFIX}{module_name}.{key}"] = value.detach().clone()
    # The loaders refuse NaN and inf (a model that diverged): refuse them here too, before writing a
    # file that could not be loaded back.
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ValueError(f"{what}: {broken[:6]} hold NaN or inf values (did training diverge?); nothing was written")
    meta.update(format=FORMAT, format_version=str(FORMAT_VERSION), memories=json.dumps(described))
    if attach_config is not None:
        meta["attach_config"] = attach_config
    if modules:
        meta["modules"] = json.dumps(list(modules))
    # Written beside the target and renamed over it: a failed save never leaves a truncated file
    # in place of a good one.
    partial = f"{path}.partial-{os.getpid()}"
    try:
        save_file(tensors, partial, metadata=meta)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _warn_unsaved(model, path, what)


def _warn_unsaved(model: nn.Module, path: str, what: str) -> None:
    """One warning if ``model`` holds state that changes its outputs and that the file does not hold
    (the format has no place for it): a live LoRA not stored in the memory, a merged or folded update."""
    projs = projections(model)
    live = sum(_live_lora_unstored(proj) for proj in projs)
    held = [proj.merged_update.kind for proj in projs if proj.merged_update is not None]
    merged, folded = held.count("merged"), held.count("folded")
    if not (live or merged or folded):
        return
    parts = []
    if live:
        parts.append(f"{live} hold a live adaptation LoRA that is not in the memory (nor in the file): store it "
                     "there first with mira.write_adapters(model)")
    if merged:
        parts.append(f"{merged} hold a merged LoRA in their base weight, which the file (no backbone weights) "
                     "lacks: mira.unmerge(model), then mira.write_adapters(model)")
    if folded:
        parts.append(f"{folded} hold a folded mixture of the memory in their base weight, which the file lacks (a "
                     "loaded model runs the memory per sample): save the unfolded model (mira.unfold(model)), and "
                     "keep the fold's slot weights (each projection's merged_update.slot_weights) yourself to "
                     "mira.fold again after loading")
    warnings.warn(f"{what}: wrote {path} without state that changes the model's outputs: of its {len(projs)} MIRA "
                  f"projections, {'; '.join(parts)}", stacklevel=4)


def _live_lora_unstored(proj: MiraProjection) -> bool:
    """Whether ``proj``'s live LoRA is a nonzero update that no slot of its memory holds exactly (as
    :func:`mira.write_adapters` with ``reset=False`` leaves it: then it is in the file)."""
    lora_a, lora_b = proj.lora_a.detach(), proj.lora_b.detach()
    if lora_a.is_meta or not (bool(lora_b.any()) and bool(lora_a.any())):
        return False  # a fresh LoRA (B zero) adds nothing
    bank_a, bank_b = proj.memory.stored_adapters
    if bank_a.shape[0] == 0:
        return True
    # As write_adapters stores it: converted to the banks' dtype.
    same_a = (bank_a.detach() == lora_a.to(bank_a)).flatten(1).all(dim=1)
    same_b = (bank_b.detach() == lora_b.to(bank_b)).flatten(1).all(dim=1)
    return not bool((same_a & same_b).any())


def _checked_metadata(metadata: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """The caller's metadata entries, refused by name unless safetensors can store them (checked before
    any work: a refused save writes nothing)."""
    meta = dict(metadata or {})
    not_text = {k: v for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))}
    if not_text:  # safetensors' own error names neither the entry nor the call
        raise TypeError(f"{what}: metadata keys and values must be str (safetensors stores text), got "
                        f"{not_text!r}; e.g. metadata={{'epoch': '3'}}")
    for key, value in meta.items():
        for part, text in (("key", key), ("value", value)):
            try:  # stored as UTF-8: a lone surrogate (a surrogateescape decode) raised a bare UnicodeEncodeError
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{what}: the metadata entry {key!r}: {value!r} is not valid UTF-8 text ({part} "
                                 f"position {err.start}: {err.reason}); nothing was written") from None
    reserved = set(_RESERVED) & set(meta)
    if reserved:
        raise ValueError(f"{what}: metadata keys {sorted(reserved)} are reserved")
    return meta


def _portable(config: dict) -> dict:
    """A config as written: ``bank_dtype`` only where set, so that a file of a model attached without
    it reads in versions that predate the option (the format version is unchanged)."""
    if config.get("bank_dtype", "") is None:
        config = {k: v for k, v in config.items() if k != "bank_dtype"}
    return config


def _read_memory_file(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor], dict]:
    """(metadata, tensors, described memories) of a MIRA memory file; errors name the file and the cause."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a MIRA memory file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such MIRA memory file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as a safetensors file ({err}); is it a MIRA memory file?") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MIRA memory file (metadata format={meta.get('format')!r})")
    if "format_version" not in meta:
        raise ValueError(f"{path}: the metadata entry format_version is missing")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise ValueError(f"{path}: format_version {meta['format_version']!r} is not an integer") from None
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this version reads 1..{FORMAT_VERSION}")
    if "memories" not in meta:
        raise ValueError(f"{path}: the metadata entry 'memories' (what each memory holds) is missing")
    try:
        described = json.loads(meta["memories"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the metadata entry 'memories' is not valid JSON ({err})") from None
    if not isinstance(described, dict):
        raise ValueError(f"{path}: the metadata entry 'memories' must be a JSON object, got {type(described).__name__}")
    return meta, tensors, described


def _finite_tensor(path: str, key: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as ``like``'s dtype and device, refused unless floating and finite before and after."""
    if not value.is_floating_point():
        raise TypeError(f"{path}: {key} has dtype {value.dtype}; MIRA memories hold floating tensors")
    # Checked widened where isfinite has no kernel (float8_e4m3fn): an 8-bit file converts exactly.
    if not bool(torch.isfinite(value if value.element_size() > 1 else value.float()).all()):
        raise ValueError(f"{path}: {key} holds NaN or inf values")
    converted = value.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(converted).all()):
        raise ValueError(f"{path}: {key} holds values too large for the model's {like.dtype}")
    # (like.dtype is the model's: for the banks their bank_dtype, which may differ from the file's.)
    return converted


def _plan_memory(path: str, name: str, entry, memory: AdapterMemory, proj, tensors: Mapping[str, torch.Tensor]):
    """Everything one memory's load needs, checked and converted: (keys, bank_a, bank_b, names, query state).

    Raises on any fault; changes nothing.
    """
    where = f"{path}: {name}"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError(f"{where}: the metadata must hold a config object for each memory, got {entry!r}")
    saved_fields = entry["config"]
    if saved_fields.get("query") != "mlp" and saved_fields.get("query_hidden") is not None:
        # Written before query_hidden was refused without an MLP query: there it was inert.
        saved_fields = {**saved_fields, "query_hidden": None}
    try:
        saved = MemoryConfig.from_dict(saved_fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the saved config is invalid ({err})") from None
    # query_hidden as built: None and the block width make the same module.
    field = {"query_hidden": "hidden_width"}
    diffs = [f"{k}: file {getattr(saved, field.get(k, k))!r}, model {getattr(memory.config, field.get(k, k))!r}"
             for k in _MUST_MATCH if getattr(saved, field.get(k, k)) != getattr(memory.config, field.get(k, k))]
    offsets = entry.get("slice_offsets")
    if offsets is not None and not (isinstance(offsets, list) and all(type(o) is int for o in offsets)):
        raise ValueError(f"{where}: slice_offsets must be a list of ints or null, got {offsets!r}")
    if proj is not None and offsets is not None and tuple(offsets) != proj.slice_offsets:
        diffs.append(f"slice_offsets: file {offsets}, model {list(proj.slice_offsets)}")
    if diffs:
        hint = "attach with the same arguments"
        if saved.num_prefix_tokens != memory.config.num_prefix_tokens:
            # Not an argument of attach: the backbone's CLS / register / distillation tokens.
            hint = (f"the file comes from a backbone with {saved.num_prefix_tokens} prefix token(s) (CLS, registers, "
                    f"distillation), this model has {memory.config.num_prefix_tokens}: load it into the "
                    "architecture it was trained on")
        elif saved.key_norm != memory.config.key_norm:
            # The default changed from "unit" to the authors' "per_feature": files saved with the
            # old default stay loadable, into a model attached the way they were trained.
            hint = (f"the keys were trained for key_norm={saved.key_norm!r} retrieval; load the file into a "
                    f"model attached with mira.attach(model, key_norm={saved.key_norm!r}, ...) "
                    "and otherwise the same arguments")
        raise ValueError(f"load_memories: {where} was saved with another configuration ({'; '.join(diffs)}); "
                         f"{hint}")
    n = entry.get("num_slots")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: num_slots must be an int >= 0, got {n!r}")
    if memory.capacity is not None and n > memory.capacity:
        raise ValueError(f"load_memories: {where} holds {n} adapters but the model's capacity is {memory.capacity}")

    c = memory.config
    expected = {"keys": (n, c.d_k), "bank_a": (n, c.num_slices, c.rank, c.d_in),
                "bank_b": (n, c.num_slices, c.slice_width, c.rank)}
    query_prefix = f"{name}.query_module."
    current_query = memory.query_module.state_dict()
    file_query = {k[len(query_prefix):]: v for k, v in tensors.items() if k.startswith(query_prefix)}
    own = {k[len(name) + 1:] for k in tensors if k.startswith(name + ".") and not k.startswith(query_prefix)}
    missing = [f"{name}.{k}" for k in expected if k not in own]
    missing += [query_prefix + k for k in current_query if k not in file_query]
    unexpected = [f"{name}.{k}" for k in sorted(own - set(expected))]
    unexpected += [query_prefix + k for k in sorted(set(file_query) - set(current_query))]
    if missing or unexpected:
        raise ValueError(f"{where}: tensors missing from the file: {missing}; in the file but not in the model's "
                         f"memory: {unexpected}")
    planned = {}
    for k, shape in expected.items():
        t = tensors[f"{name}.{k}"]
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: {name}.{k} must have shape {shape} (num_slots = {n} and the model's "
                             f"config), got {tuple(t.shape)}")
        # Into the model's storage dtype: the banks' own (bank_dtype), which may differ from the file's
        # (a storage choice): float32 banks into 16-bit ones round as contract section 4 bounds;
        # float16 refuses entries beyond its range (finite in the file, inf after conversion).
        planned[k] = _finite_tensor(path, f"{name}.{k}", t, memory.keys if k == "keys" else getattr(memory, k))
    # Every row of the file is a stored adapter (empty slots are not written). A zero key (also one
    # that rounds to zero in the model's dtype) has no direction to retrieve by, and the op's gradient
    # of it is g / eps (~4e13): append refuses it, and so does a load.
    zero = zero_key_rows(planned["keys"])
    if zero:
        raise ValueError(f"load_memories: {where}: the keys of slots {zero} are all "
                         "zeros; a stored adapter's key needs a direction (cosine retrieval), as append requires. "
                         "Nothing was loaded: give those slots nonzero keys in the file, or remove them")
    query_state = {}
    for k, like in current_query.items():
        t = file_query[k]
        if t.shape != like.shape:
            raise ValueError(f"{path}: {query_prefix}{k} must have shape {tuple(like.shape)} (the model's query "
                             f"module), got {tuple(t.shape)}")
        query_state[k] = _finite_tensor(path, query_prefix + k, t, like)
    names = entry.get("slot_names")  # absent from version-1 files: the slots load unnamed
    if names is not None:
        if not isinstance(names, list) or len(names) != n or not all(
                x is None or isinstance(x, str) and x for x in names):
            raise ValueError(f"{where}: slot_names must be a list of {n} non-empty strings or nulls, got {names!r}")
    return planned["keys"], planned["bank_a"], planned["bank_b"], names, query_state


def load_memories(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict[str, str]:
    """Replace the contents of ``model``'s memories by those saved in ``path``.

    The model must be attached with the same arguments (the same backbone need not be loaded:
    the file holds no backbone weights). ``capacity`` and ``trainable_bank`` may differ. Every
    tensor of the file is checked (shapes against the model, dtypes, finite values) before any
    memory changes: a call that raises leaves the model as it was.

    Args:
        strict: every memory of the model must be in the file and vice versa; with False, the
            memories both hold are loaded, and a file that shares none with the model is refused.

    Returns:
        The file's metadata.
    """
    named = dict(named_memories(model))
    if not named:  # else strict blamed the file ("missing from the file: []") and strict=False loaded nothing
        raise RuntimeError("load_memories: the model has no MIRA memories (call mira.attach first)")
    path = os.fsdecode(path)
    meta, tensors, described = _read_memory_file(path)
    owners = _projection_of(model)
    missing = sorted(set(named) - set(described))
    unexpected = sorted(set(described) - set(named))
    if strict and (missing or unexpected):
        raise KeyError(f"load_memories: {path}: memories missing from the file: {missing}; in the file but not "
                       f"in the model: {unexpected}")
    if not set(named) & set(described):
        # Refused, not warned, also with strict=False: it loads the memories the file and the model share
        # (a model attached to fewer blocks), and none shared is never that case but a mismatch of names
        # (a file saved from a wrapped model: "0." or DDP's "module." before each name) or of models. A
        # warning would let the model serve with memories it was never given (empty, or stale).
        raise KeyError(f"load_memories: {path}: no memory of the file is one of the model's (file: {unexpected}; "
                       f"model: {missing}); nothing was loaded. Memories are named by their qualified module "
                       "names: save and load the same module (not a wrapper of it)")
    stray = sorted(k for k in tensors if not k.startswith(MODULE_PREFIX)
                   and not any(k.startswith(name + ".") for name in described))
    if stray:
        raise ValueError(f"{path}: tensors {stray[:6]} belong to no memory the metadata describes")

    plan = [(named[name], _plan_memory(path, name, entry, named[name], owners.get(id(named[name])), tensors))
            for name, entry in described.items() if name in named]
    # Every check passed and every tensor is converted: now change the model (nothing below can fail).
    for memory, (keys, bank_a, bank_b, names, query_state) in plan:
        memory._replace_contents(keys, bank_a, bank_b, names)
        memory.query_module.load_state_dict(query_state)
    return meta


def _adapted_qkv(model: nn.Module, config: MiraConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every ``attn.qkv`` that ``attach(model, config)`` will wrap, chosen as
    attach chooses them; changes nothing."""
    found = _qkv_blocks(model)
    if config.blocks is not None:  # indices out of range or repeated: attach refuses them before any change
        found = [found[b % len(found)] for b in config.blocks if -len(found) <= b < len(found)]
    return [(f"{name}.attn.qkv" if name else "attn.qkv", block.attn.qkv) for name, block in found]


def _plan_modules(path: str, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], model: nn.Module,
                  adapted: Sequence[tuple[str, nn.Module]]):
    """{name: (module, checked state dict)} of the modules saved beside the memories; changes nothing.

    ``model`` is the bare backbone, ``adapted`` the qkv projections attach will wrap in it.
    """
    try:
        names = json.loads(meta.get("modules", "[]"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the metadata entry 'modules' is not valid JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: the metadata entry 'modules' must be a list of module names, got {names!r}")
    available = dict(model.named_modules())
    plan = {}
    for name in names:
        module = available.get(name)
        if module is None:
            raise KeyError(f"load_model: {path} holds the module {name!r}, which the backbone does not have")
        # Its state is checked here against the bare backbone, but attach changes it (wraps the qkv,
        # adds the block's memory, moves BEiT's q/v biases): loading it after attach fails, or loads
        # the backbone's frozen qkv weight (the wrapped layer). save_model never writes such a module.
        inside = [qkv_name for qkv_name, qkv in adapted if any(m is qkv for m in module.modules())]
        if inside:
            raise ValueError(f"load_model: {path} holds the state of {name!r}, which is or contains {inside[0]!r}, a "
                             "qkv projection that attach adapts (the saved attach config): its state is not the "
                             "attached model's, and nothing was changed; a file of save_model holds only modules "
                             "outside MIRA's layers (e.g. 'head')")
        prefix = f"{MODULE_PREFIX}{name}."
        saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        current = module.state_dict()
        if set(saved) != set(current):
            raise ValueError(f"load_model: {path}: {name} holds {sorted(saved)}, the backbone's {sorted(current)}")
        state = {}
        for key, like in current.items():
            t = saved[key]
            if t.shape != like.shape:
                raise ValueError(f"load_model: {path}: {name}.{key} has shape {tuple(t.shape)}, the backbone's "
                                 f"{tuple(like.shape)} (create the backbone as it was saved, e.g. with the same "
                                 "num_classes)")
            kind, kind_like = (t.is_floating_point(), t.dtype == torch.bool), (like.is_floating_point(),
                                                                              like.dtype == torch.bool)
            if kind != kind_like:  # a float into an integer buffer would truncate, an int skip the checks
                raise TypeError(f"load_model: {path}: {name}.{key} has dtype {t.dtype}, the backbone's {like.dtype}")
            state[key] = _finite_tensor(path, prefix + key, t, like) if t.is_floating_point() else t.to(like.device)
        plan[name] = (module, state)
    stray = sorted(k for k in tensors if k.startswith(MODULE_PREFIX) and not any(
        k.startswith(f"{MODULE_PREFIX}{n}.") for n in names))
    if stray:
        raise ValueError(f"{path}: tensors {stray[:6]} belong to no module the metadata lists")
    return plan


def load_model(model: nn.Module, path: str | os.PathLike, *, example_input: torch.Tensor | None = None,
               stage: str = "inference") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` from a fresh backbone, in one call.

    ``model`` is the backbone as it was before ``attach`` (same architecture, same pretrained
    weights, same head shape). This attaches MIRA with the saved config, loads the memories
    (slot names included), the query modules and the saved modules (the head), then sets
    ``stage`` and eval mode. Everything in the file is checked before the model changes; if a
    step fails, MIRA is detached again and the backbone left as it was. A saved module that attach
    changes (one holding an adapted block's ``attn.qkv``) is refused: save_model saves none.

    Returns:
        ``model``, attached and loaded.
    """
    if stage not in STAGES:  # checked first: the model must not change on a call that fails
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    path = os.fsdecode(path)
    meta, tensors, _ = _read_memory_file(path)
    version = int(meta["format_version"])
    if "attach_config" not in meta:
        why = (f"it has format version {version}, written before whole-model files existed"
               if version < 2 else "it was saved from blocks attached with different options")
        raise ValueError(f"load_model: {path} holds memories only, without the attach config ({why}); attach the "
                         "backbone with the arguments it was saved with, then call mira.load_memories(model, path)")
    try:
        config = MiraConfig(**json.loads(meta["attach_config"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the saved attach config is invalid or from a newer version ({err})") from None
    if projections(model):
        raise RuntimeError("load_model: the model already has MIRA layers; pass the backbone before attach")
    module_plan = _plan_modules(path, meta, tensors, model, _adapted_qkv(model, config))
    # The planned modules' tensors as they are, to put back if a load fails part way (detach
    # restores what attach changed, not the head).
    originals = {name: {k: t.detach().clone() for k, t in module.state_dict(keep_vars=True).items()}
                 for name, (module, _) in module_plan.items()}
    attach(model, config, example_input=example_input)
    try:
        load_memories(model, path)
        set_stage(model, stage)
        attached = dict(model.named_modules())
        for name, (module, _) in module_plan.items():
            # _adapted_qkv chose the blocks as attach does; checked again on what attach did.
            if attached.get(name) is not module or any(isinstance(m, (AdapterMemory, MiraProjection))
                                                       for m in module.modules()):
                raise RuntimeError(f"load_model: attach changed {name!r}, whose state {path} holds; nothing was "
                                   "changed")
        with torch.no_grad():  # checked above (_plan_modules); a failure (a hook of the caller's) restores all
            for module, state in module_plan.values():
                module.load_state_dict(state)
    except Exception:
        try:
            with torch.no_grad():  # in place, as load_state_dict copies, and without the modules' load hooks
                for name, (module, _) in module_plan.items():
                    current = module.state_dict(keep_vars=True)
                    for key, value in originals[name].items():
                        current[key].copy_(value)
        finally:
            detach(model)
        raise
    return model.eval()


# ----------------------------------------------------------------------------------------------
# PEFT import.
# ----------------------------------------------------------------------------------------------

# PEFT options under which a module's output is not x W^T + scaling * (x A^T) B^T.
_FORWARD_CHANGING = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "alora_invocation_tokens", "arrow_config",
                     "kasa_config", "velora_config", "monteclora_config", "layer_replication")

# init_lora_weights values under which PEFT also changes the base weight (by prefix: "pissa_niter_4").
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


def _read_peft(source, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) from a PEFT adapter directory or a (state_dict, config) pair."""
    if isinstance(source, (str, bytes, os.PathLike)):
        root = os.fsdecode(source)  # bytes paths too, as save_* / load_* take them
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} is not a PEFT adapter directory (adapter_config.json + weights)")
        # save_pretrained writes the adapter "default" to the folder and any other to <folder>/<name>/,
        # with unnamed keys in both: read from the folder, adapter_name chose nothing (the default came).
        named = os.path.join(root, adapter_name)
        if adapter_name != "default":
            if not os.path.isfile(os.path.join(named, "adapter_config.json")):
                raise FileNotFoundError(f"{root} holds no adapter named {adapter_name!r}: PEFT's save_pretrained "
                                        f"writes it to {named}{os.sep} (the folder itself holds 'default')")
            root = named
        # Errors name the file and the cause (JSON, safetensors and unpickling errors name neither).
        config_path = os.path.join(root, "adapter_config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: no such file; a PEFT adapter directory holds "
                                    "adapter_config.json + weights")
        with open(config_path) as f:
            try:
                config = json.load(f)
            except ValueError as err:
                raise ValueError(f"{config_path} is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        weights = os.path.join(root, "adapter_model.safetensors")
        try:
            if os.path.exists(weights):
                from safetensors.torch import load_file

                state = load_file(weights)
            else:
                weights = os.path.join(root, "adapter_model.bin")
                if not os.path.exists(weights):
                    raise FileNotFoundError(f"{root} has neither adapter_model.safetensors nor adapter_model.bin")
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # SafetensorError, UnpicklingError, EOFError, ...: whatever the reader raises
            raise ValueError(f"{weights}: cannot read the PEFT weights ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else err!r})") from None
        return state, config
    try:
        state, config = source
    except (TypeError, ValueError):
        raise TypeError("source must be a PEFT adapter directory or a (state_dict, config) pair") from None
    # Named here: these raised "vars() argument must have __dict__ attribute" and "'NoneType' object is not iterable".
    if not isinstance(config, Mapping):
        if not hasattr(config, "to_dict") and not hasattr(config, "__dict__"):
            raise TypeError(f"config must be a mapping or a PEFT config, got {type(config).__name__}")
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    try:
        state = dict(state)
    except (TypeError, ValueError):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state).__name__}") from None
    return state, dict(config)


def _lora_modules(state: Mapping[str, torch.Tensor], adapter_name: str, prefix: str,
                  ignore_unmatched: bool, modules_to_save=None) -> dict[str, dict]:
    modules: dict[str, dict] = {}
    others = []
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        adapter = match["adapter"]
        if adapter is not None and adapter != adapter_name:
            continue
        if match["param"] == "bias":
            raise ValueError(f"{key}: LoRA with a bias on B (lora_bias) has no MIRA equivalent")
        module = match["module"]
        if module.startswith(prefix):
            module = module[len(prefix):]
        factors = modules.setdefault(module, {})
        if match["factor"] in factors:  # e.g. saved with and without the adapter name: which one is meant?
            raise ValueError(f"PEFT module {module} has lora_{match['factor']} twice (the last key: {key}); "
                             "keep one, or name the adapter with adapter_name")
        factors[match["factor"]] = value
    frozen = _frozen_keys(others, prefix, modules_to_save)
    if frozen:
        # peft_model.state_dict() holds the whole model: every backbone tensor (the wrapped layers'
        # ".base_layer.weight", a module to save's ".original_module."), which nothing trained. Calling
        # them trained tensors, as below, sent users looking for modules_to_save they never had.
        more = "..." if len(frozen) > 3 else ""
        what = (f"import_peft: the PEFT source looks like a full PeftModel.state_dict(): besides the LoRA "
                f"factors it holds {len(frozen)} tensors that PEFT does not train ({frozen[:3]}{more}: the frozen "
                "backbone, neither LoRA factors, nor biases, nor modules_to_save), which this import does not "
                "load. Pass the adapter's own state dict, peft.get_peft_model_state_dict(peft_model) (what "
                "save_pretrained writes), with its config")
        if not ignore_unmatched:
            raise ValueError(f"{what}; or pass ignore_unmatched=True to import the LoRA factors alone")
        warnings.warn(f"{what}; this import reads the LoRA factors alone: load any tensors trained beside them "
                      "(modules_to_save, biases) into the model yourself", stacklevel=3)
    elif others:
        # Trained with the adapter (modules_to_save: a head; bias="all" / "lora_only": biases) and part
        # of the PEFT model's outputs, not of an adapter value: without them the model is not PEFT's
        # (a warning alone left outputs 0.2-7.8 off). Refused as unmatched LoRA modules are.
        what = (f"import_peft: the PEFT source also holds {len(others)} trained tensors that are not LoRA factors "
                f"({others[:3]}{'...' if len(others) > 3 else ''}: modules_to_save, or biases trained with "
                "bias='all' / 'lora_only'), which this import does not load, so outputs would not match PEFT's")
        if not ignore_unmatched:
            raise ValueError(f"{what}; pass ignore_unmatched=True to import the LoRA factors alone and load those "
                             f"tensors yourself (without the {prefix!r} prefix, by the model's own names)")
        warnings.warn(f"{what}; load them into the model yourself", stacklevel=3)
    for module, factors in modules.items():
        if set(factors) != {"A", "B"}:
            raise ValueError(f"PEFT module {module} has lora_{''.join(factors)} but not both lora_A and lora_B")
    return modules


def _frozen_keys(keys: Sequence[str], prefix: str, modules_to_save) -> list[str]:
    """The frozen backbone tensors among ``keys`` (a PEFT source's tensors that are not LoRA factors) if
    they are those of a full ``PeftModel.state_dict()``, else []."""
    # Only the full state dict holds a wrapped layer's base weight, a module to save's frozen original,
    # or the model's own parameters (cls_token, pos_embed: modules_to_save names modules, never the root).
    # Other keys may be a hand-made pair's trained head whose config omits modules_to_save: not judged.
    def marker(key: str) -> bool:
        rest = key[len(prefix):] if key.startswith(prefix) else key
        return ".original_module." in key or ".base_layer." in key and not key.endswith(".bias") or "." not in rest

    if not any(marker(key) for key in keys):
        return []
    # Named in the message: what get_peft_model_state_dict would not write. It writes biases (bias="all" /
    # "lora_only") and the modules to save (by PEFT's rule, a module whose name ends with an entry).
    saved = [m for m in (modules_to_save or ()) if isinstance(m, str) and m]
    return [key for key in keys if marker(key) or not key.endswith(".bias")
            and not any(f".{m}." in f".{key}" for m in saved)]


def _check_alpha(where: str, value) -> None:
    # Checked before any use: a NaN or inf alpha was reported as factors "too large" for the model's
    # dtype, a string or null one as "unsupported operand type(s) for /".
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"import_peft: {where} in the PEFT config must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"import_peft: {where} in the PEFT config must be a finite number, got {value!r}")


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    # PEFT's rank/alpha patterns name a module by a suffix (a regex) of its qualified name.
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def import_peft(
    model: nn.Module,
    source,
    *,
    into: str = "lora",
    adapter_name: str = "default",
    keys: torch.Tensor | Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    task: str | None = None,
    module_names: Mapping[str, str] | None = None,
    drop_unused_rows: bool = False,
    ignore_unmatched: bool = False,
    prefix: str = "base_model.model.",
) -> list[int]:
    """Import a LoRA adapter saved by PEFT: as the live adaptation LoRA (default) or into the memory.

    * ``into="lora"`` (default) sets every projection's live adaptation LoRA to the PEFT adapter.
      The model then reproduces the PEFT model (to float rounding: the fused op sums in another
      order than PEFT's ``base(x) + scale * B(A(x))``) in the ``adaptation`` stage (where
      ``attach`` leaves it), or after :func:`mira.merge`; :func:`mira.write_adapters` stores it
      in the memory later, like a LoRA trained here.
    * ``into="memory"`` appends it to every memory as one value (with ``keys`` / ``generator`` /
      ``task`` as :func:`mira.write_adapters`). Retrieval then weights it as MIRA weights any
      slot, and **the authors' one-slot rule** applies: with the default affine separation a
      memory of one slot uses the raw cosine ``cos(q, k)`` as that slot's weight (not 1), and
      A and B are both scaled by it, so the model differs from PEFT's. A one-slot memory with
      ``separation="softmax"`` gives weight exactly 1 and reproduces PEFT.

    **PEFT LoRAs with nonzero k rows.** A PEFT LoRA on the packed qkv also changes the k rows
    unless they are zero, and MIRA adapts only its slices (q and v by default). Such an adapter
    is refused, whatever ``into``; ``drop_unused_rows=True`` drops the rows outside MIRA's
    slices (outputs then differ from PEFT's), and attaching with ``slices=("q", "k", "v")``
    imports it (to rounding).

    Two layouts are understood:

    * packed (default): LoRA on the block's ``attn.qkv``. One A is shared by q, k and v, so it
      is used for every MIRA slice, and each slice takes its rows of B. Rows of B outside MIRA's
      slices (the k rows for slices q, v) must be zero, else the import refuses unless
      ``drop_unused_rows=True`` (then they are dropped and outputs differ from PEFT's).
    * separate: LoRA on per-slice projections; ``module_names`` maps each MIRA slice name to the
      PEFT module path, with ``{block}`` for the block's qualified name, e.g.
      ``{"q": "{block}.attn.q_proj", "v": "{block}.attn.v_proj"}``.

    PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rslora; ``alpha_pattern`` honoured) is folded
    into the stored B (divided by the memory's ``scale``), in float64 and rounded once to the
    model's dtype. A PEFT rank below the memory's is padded (exact: B's extra columns are zero; with
    ``into="lora"`` A's extra rows start as a fresh LoRA's, so that they train); a higher one is
    refused. Blocks without a LoRA in the file get a zero update, as PEFT leaves them unchanged
    (``into="lora"``: a fresh LoRA, B zero); LoRA modules the import does not consume, and other
    trained tensors of the source (``modules_to_save`` such as a head, biases trained with
    ``bias="all"`` / ``"lora_only"``), are refused (outputs could not match) unless
    ``ignore_unmatched=True``. Adapters whose initialisation changed the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, LoRA-GA) are refused: convert them to a plain LoRA with PEFT first.

    Args:
        source: a PEFT adapter directory (``save_pretrained``) or a ``(state_dict, config)`` pair:
            the adapter's own state dict, ``peft.get_peft_model_state_dict(peft_model)`` (what
            ``save_pretrained`` writes; not ``peft_model.state_dict()``, which also holds the frozen
            backbone and is refused), and its ``LoraConfig`` (or the config's dict), e.g.
            ``(get_peft_model_state_dict(pm), pm.peft_config["default"])``.
        adapter_name: which adapter to read (a non-empty name, without path separators): of a
            multi-adapter state dict, or of a folder, where PEFT's ``save_pretrained`` puts any
            adapter but ``"default"`` in ``<folder>/<name>/``.
        keys, generator: the new slots' keys, as :func:`mira.write_adapters` (``into="memory"``);
            with ``into="lora"``, ``generator`` draws the fresh LoRA rows PEFT gave no value.
        prefix: stripped from PEFT's module names (``base_model.model.`` for a PeftModel).

    Returns:
        ``into="memory"``: the slot index of the imported adapter in each memory (block order);
        ``into="lora"``: an empty list.
    """
    _check_module(model)  # before the adapter is read
    # Checked here: a non-str raised os.path's bare TypeErrors, "" joined to the folder itself (its
    # "default" adapter read without a word), a separator or ".." named a folder outside the adapter's.
    if not isinstance(adapter_name, str):
        raise TypeError(f"import_peft: adapter_name must be a str (the PEFT adapter's name, 'default' unless it "
                        f"was named), got {adapter_name!r}")
    separators = [sep for sep in ("/", "\\", os.sep, os.altsep, "\0") if sep and sep in adapter_name]
    if not adapter_name or adapter_name in (".", "..") or separators:
        raise ValueError(f"import_peft: adapter_name must be a PEFT adapter's name ('default' unless it was named), "
                         f"non-empty and without path separators, got {adapter_name!r}; to read an adapter in "
                         "another folder, pass that folder as source")
    if into not in ("lora", "memory"):
        raise ValueError(f"import_peft: into must be 'lora' (the live adaptation LoRA) or 'memory', got {into!r}")
    if into == "lora" and (keys is not None or task is not None):
        raise ValueError("import_peft: keys and task describe memory slots; pass into='memory' to use them")
    state, config = _read_peft(source, adapter_name)
    peft_type = str(config.get("peft_type", "LORA")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise ValueError(f"only LoRA adapters can be imported, got peft_type={config.get('peft_type')!r}")
    if config.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out=True (Conv1D layers) is not supported; MIRA wraps nn.Linear")
    variants = [k for k in _FORWARD_CHANGING if config.get(k)]
    if variants:
        raise ValueError(f"the PEFT config enables {variants}, which change the LoRA forward beyond "
                         "scale * B A x; only plain LoRA (optionally rslora) can be imported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) or config.get("loftq_config"):
        # Their factors are relative to a base weight they changed (PiSSA: W - B0 A0), which the
        # adapter file does not hold: added to the original weight they were off by ~0.1, silently.
        raise ValueError(f"import_peft: the PEFT adapter was initialised with init_lora_weights={init!r}, which "
                         "changes the base weights its factors are relative to; convert it to a plain LoRA first "
                         "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...), rank 2r)")
    alpha = config.get("lora_alpha", 8)
    _check_alpha("lora_alpha", alpha)
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, Mapping):
        raise TypeError(f"import_peft: alpha_pattern in the PEFT config must be a mapping of module patterns to "
                        f"alphas, got {alpha_pattern!r}")
    for pattern, value in alpha_pattern.items():
        _check_alpha(f"alpha_pattern[{pattern!r}]", value)
        try:  # checked alone: re.error's position is otherwise one in the pattern _pattern_value wraps it in
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"import_peft: alpha_pattern key {pattern!r} is not a regular expression "
                             f"({err})") from None
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):  # bool("false") is True: it would silently scale by alpha / sqrt(r)
        raise TypeError(f"import_peft: use_rslora in the PEFT config must be true or false, got {rslora!r}")
    available = _lora_modules(state, adapter_name, prefix, ignore_unmatched, config.get("modules_to_save"))
    if not available:
        raise ValueError("no LoRA weights (lora_A / lora_B) found in the PEFT source")

    blocks = [(name, block) for name, block in model.named_modules()
              if isinstance(getattr(getattr(block, "attn", None), "qkv", None), nn.Module)
              and isinstance(getattr(_memory_owner(block), MEMORY_ATTR, None), AdapterMemory)]
    if not blocks:
        raise RuntimeError("import_peft: the model has no MIRA layers (call mira.attach first)")
    if keys is None or isinstance(keys, torch.Tensor):
        per_block = [keys] * len(blocks)
    else:
        per_block = list(keys)
        if len(per_block) != len(blocks):
            raise ValueError(f"got {len(per_block)} keys for {len(blocks)} memories")

    used: set[str] = set()
    values = []
    for name, block in blocks:
        proj, memory = block.attn.qkv, getattr(_memory_owner(block), MEMORY_ATTR)
        c = memory.config
        block_path = f"{name}." if name else ""
        if module_names is None:
            path = f"{block_path}attn.qkv"
            sources = {s: (path, proj.slice_offsets[s]) for s in range(c.num_slices)}
        else:
            if proj.slice_names is None:
                raise ValueError("module_names needs named slices (attach with slices such as ('q', 'v'))")
            missing = [s for s in proj.slice_names if s not in module_names]
            if missing:
                raise ValueError(f"module_names has no entry for slices {missing}")
            sources = {}
            for s, n in enumerate(proj.slice_names):
                template = module_names[n]
                if not isinstance(template, str):
                    raise TypeError(f"import_peft: module_names[{n!r}] must be a string, got {template!r}")
                try:  # a typo such as {blk} raised a bare KeyError('blk')
                    sources[s] = (template.format(block=name), 0)
                except (KeyError, IndexError, ValueError) as err:
                    raise ValueError(f"import_peft: module_names[{n!r}] {template!r} is not a module path with "
                                     f"{{block}} as its only field ({type(err).__name__}: {err})") from None
        # float64 work buffers, rounded once into the model's dtype at the end (float64 LoRAs exactly)
        bank_a = torch.zeros(c.num_slices, c.rank, c.d_in, dtype=torch.float64)
        bank_b = torch.zeros(c.num_slices, c.slice_width, c.rank, dtype=torch.float64)
        imported = torch.zeros(c.num_slices, c.rank, dtype=torch.bool)  # rank rows PEFT gave values
        for s, (path, offset) in sources.items():
            factors = available.get(path)
            if factors is None:
                continue  # PEFT did not adapt this module: the equivalent value is zero
            used.add(path)
            for factor, t in (("lora_A", factors["A"]), ("lora_B", factors["B"])):
                # Named here: these raised IndexError or expand() errors; .double() drops a complex
                # factor's imaginary part silently.
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{path}: {factor} is a {type(t).__name__}, not a Tensor")
                if t.is_complex():
                    raise TypeError(f"{path}: {factor} has dtype {t.dtype}; a LoRA factor is real")
                if t.dim() != 2:
                    raise ValueError(f"{path}: {factor} has shape {tuple(t.shape)}; expected a 2-D (out, in) "
                                     "weight of a linear LoRA")
            lora_a, lora_b = factors["A"].double(), factors["B"].double()
            if not (bool(torch.isfinite(lora_a).all()) and bool(torch.isfinite(lora_b).all())):
                raise ValueError(f"{path}: the PEFT LoRA factors hold NaN or inf values")
            r = lora_a.shape[0]
            if r == 0:  # its scaling alpha / r divided by zero
                raise ValueError(f"{path}: the PEFT LoRA has rank 0 (lora_A {tuple(lora_a.shape)})")
            if lora_a.shape[1] != c.d_in or lora_b.shape[1] != r:
                raise ValueError(f"{path}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit a "
                                 f"projection of input width {c.d_in}")
            if r > c.rank:
                raise ValueError(f"{path}: PEFT rank {r} exceeds the memory's rank {c.rank}; attach with rank>={r}")
            a_ = _pattern_value(alpha_pattern, path, alpha)
            scaling = a_ / (math.sqrt(r) if rslora else r)
            if module_names is None:
                if lora_b.shape[0] != proj.out_features:
                    raise ValueError(f"{path}: lora_B has {lora_b.shape[0]} rows, the projection "
                                     f"{proj.out_features} outputs")
            elif lora_b.shape[0] != c.slice_width:
                raise ValueError(f"{path}: lora_B has {lora_b.shape[0]} rows, the slice is {c.slice_width} wide")
            rows = lora_b[offset: offset + c.slice_width]
            bank_a[s, :r] = lora_a
            bank_b[s, :, :r] = rows * (scaling / c.scale)
            imported[s, :r] = True
        if module_names is None and f"{block_path}attn.qkv" in used:
            lora_b = available[f"{block_path}attn.qkv"]["B"]
            keep = torch.zeros(lora_b.shape[0], dtype=torch.bool)
            for off in proj.slice_offsets:
                keep[off: off + c.slice_width] = True
            if bool(lora_b[~keep].ne(0).any()) and not drop_unused_rows:
                raise ValueError(
                    f"{block_path}attn.qkv: the PEFT adapter changes output rows outside MIRA's slices "
                    f"{proj.slice_names or proj.slice_offsets} (e.g. the k rows of a packed qkv); MIRA cannot "
                    "store them. Pass drop_unused_rows=True to drop them (outputs will differ from PEFT's)"
                )
        values.append((memory, bank_a, bank_b, imported))
    if not used:
        raise ValueError(f"import_peft: no LoRA module of the source matches the model's MIRA blocks; the source "
                         f"adapts {sorted(available)[:6]}...")
    unmatched = sorted(set(available) - used)
    if unmatched and not ignore_unmatched:
        raise ValueError(f"import_peft: the source also adapts {unmatched[:6]}{'...' if len(unmatched) > 6 else ''}, "
                         "which MIRA does not cover; pass ignore_unmatched=True to import the rest anyway")
    if into == "lora":
        if any(block.attn.qkv.merged_update is not None for _, block in blocks):
            raise RuntimeError("import_peft: the model holds a merged or folded update; unmerge / unfold first")
        converted = []
        with _restored_on_error(generator):  # a refusal below draws nothing (contract section 9)
            for (name, block), (_, bank_a, bank_b, imported) in zip(blocks, values):
                converted.append(_as_live_lora(name, block.attn.qkv, bank_a, bank_b, imported, generator))
        with torch.no_grad():  # every block checked above; the copies cannot fail
            for lora_a, lora_b, a, b in converted:
                lora_a.copy_(a)
                lora_b.copy_(b)
        return []
    with _restored_on_error(generator):  # every memory checked before any changes
        prepared = [(memory, memory._prepare_append(bank_a.to(memory.keys.dtype), bank_b.to(memory.keys.dtype), key,
                                                    generator=generator, names=task))
                    for (memory, bank_a, bank_b, _), key in zip(values, per_block)]
    return [memory._commit_append(*checked)[0] for memory, checked in prepared]


def _as_live_lora(name: str, proj: MiraProjection, bank_a: torch.Tensor, bank_b: torch.Tensor, imported: torch.Tensor,
                  generator: torch.Generator | None) -> tuple:
    """(lora_a, lora_b, new A, new B) of one block's import into the live LoRA, checked; changes nothing."""
    lora_a, lora_b = proj.lora_a, proj.lora_b
    a, b = bank_a.to(lora_a), bank_b.to(lora_b)
    if not bool(imported.all()):
        # Rank rows PEFT gave no value (a lower rank, a block it did not adapt) start as a fresh
        # LoRA's do (A kaiming-uniform, B zero: MiraProjection.reset_lora), not as zeros, whose
        # gradients are exactly zero: the outputs are the same and the adapter still trains.
        fresh = torch.empty(a.shape, dtype=a.dtype)  # drawn on the CPU: a CPU generator serves any device
        for slice_a in fresh:
            nn.init.kaiming_uniform_(slice_a, a=math.sqrt(5), generator=generator)
        a = torch.where(imported.to(a.device).unsqueeze(-1), a, fresh.to(a.device))
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError(f"import_peft: {name}: the LoRA factors scaled by lora_alpha / r are too large for "
                         f"the model's {lora_b.dtype}; nothing was changed")
    return lora_a, lora_b, a, b
