"""timm glue: attach MIRA to a Vision Transformer, collect its parts, switch stages.

:func:`attach` inserts at timm's block seam: every selected block gets an
:class:`~mira.memory.AdapterMemory` as ``block.mira_memory`` and its ``attn.qkv`` is wrapped in
a :class:`~mira.layers.MiraProjection`. No ViT code is copied; the model's own forward runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from torch.overrides import is_tensor_like

from . import families
from .config import SLICE_NAMES, STAGES, MemoryConfig, MiraConfig
from .layers import MiraProjection
from .memory import AdapterMemory, _callers_load

__all__ = [
    "MEMORY_ATTR",
    "association_matrices",
    "attach",
    "config_of",
    "detach",
    "memories",
    "named_memories",
    "projections",
    "set_stage",
    "trainable_parameters",
    "count_parameters",
    "write_adapters",
]

#: Name under which each adapted block holds its memory.
MEMORY_ATTR = "mira_memory"

_SUPPORTED = (
    "mira.attach supports timm Vision Transformers whose blocks have an `attn.qkv` nn.Linear that the "
    "attention calls on per-image tokens (B, T, d): VisionTransformer (vit_tiny/small/base_patch16_224, ...), "
    "DeiT (deit_*), BEiT and EVA / EVA-02 with a fused qkv (eva02_tiny/small; their q/v biases are moved into "
    "attn.qkv), and other timm models with that block structure. Not supported: attention with separate q/k/v "
    "projections (EVA-02 base/large: qkv_fused=False), windowed or spatial attention (Swin, SwinV2, SAM), and "
    "models that call F.linear on attn.qkv.weight in another way."
)


def _qkv_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks (in module order) whose ``attn.qkv`` is an nn.Linear or an installed MiraProjection."""
    found = []
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, nn.Module) and isinstance(getattr(attn, "qkv", None), (nn.Linear, MiraProjection)):
            found.append((name, module))
    return found


def _memory_owner(block: nn.Module) -> nn.Module:
    """The module that holds a block's memory as ``mira_memory``: the block itself, unless its
    forward calls every child in turn (an nn.Sequential, as each attention branch of timm's parallel
    ViT blocks is: the memory would be called as a layer); then its attention module."""
    return block.attn if isinstance(block, nn.Sequential) else block


def _vit_of(model: nn.Module, block_names: list[str]) -> nn.Module:
    """The ViT that owns the blocks, their token layout (``cls_token``, ``num_prefix_tokens``) and
    input size (``patch_embed``): the innermost common ancestor of the blocks that defines one of
    them, else ``model``. A wrapper (timm's ``features_only`` FeatureGetterNet holds the ViT at
    ``.model``) has none itself: read from it, the ViT's CLS token went unseen, the mean query
    averaged the CLS token in, and the dry run's input size was not found."""
    common = block_names[0].split(".")[:-1]
    for name in block_names[1:]:
        parts = name.split(".")
        while common and parts[:len(common)] != common:
            common = common[:-1]
    for depth in range(len(common), 0, -1):
        owner = model.get_submodule(".".join(common[:depth]))
        if any(hasattr(owner, a) for a in ("cls_token", "num_prefix_tokens", "patch_embed")):
            return owner
    return model


def _example_input(model: nn.Module, batch: int) -> torch.Tensor:
    param = next(model.parameters())
    size = None
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is not None and isinstance(proj, nn.Conv2d):
        size = (proj.in_channels, *img_size)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
    if size is None:
        raise ValueError(
            f"mira.attach cannot tell the input size of {type(model).__name__} for its dry run; "
            "pass example_input=<a small input batch>"
        )
    if param.device.type == "meta":  # a model built on the meta device: shapes only, no values to draw
        return torch.empty(batch, *size, device=param.device, dtype=param.dtype)
    # A generator of its own: the dry run's input takes nothing from the global random stream. (attach
    # still draws from it, as any new module does: each memory's keys and query module and each
    # LoRA's A are initialised from it, so a seeded run draws other numbers after attach than without.)
    generator = torch.Generator(device=param.device).manual_seed(0)
    return torch.randn(batch, *size, device=param.device, dtype=param.dtype, generator=generator)


def _probe(model: nn.Module, blocks: list[tuple[str, nn.Module]], example_input: torch.Tensor,
           what: str) -> tuple[dict[str, int], torch.Size | None]:
    """Run the model once and check that each block's ``attn.qkv`` is called once per forward on
    per-image tokens (B, T, d) equal to the attention module's input (from which the query is made).

    Returns:
        Each block's token count T, and the shape of ``model.patch_embed``'s output (None without one).
    """
    batch = example_input.shape[0]
    attn_inputs: dict[str, torch.Tensor] = {}
    calls: dict[str, list[tuple[tuple, bool]]] = {name: [] for name, _ in blocks}
    handles = []
    patch_shape: list[torch.Size] = []

    patch_embed = getattr(model, "patch_embed", None)
    if isinstance(patch_embed, nn.Module):
        def patch_hook(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out  # XCiT's also returns the grid
            if isinstance(out, torch.Tensor):
                patch_shape.append(out.shape)

        handles.append(patch_embed.register_forward_hook(patch_hook))

    for name, block in blocks:
        def attn_hook(module, args, kwargs, name=name):
            attn_inputs[name] = args[0] if args else kwargs.get("x")

        def qkv_hook(module, args, name=name):
            x, seen = args[0], attn_inputs.get(name)
            same = seen is not None and (x is seen or (x.shape == seen.shape and torch.equal(x, seen)))
            calls[name].append((tuple(x.shape), same))

        handles.append(block.attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
        handles.append(block.attn.qkv.register_forward_pre_hook(qkv_hook))

    # Each module's own mode, put back as it was (model.train(flag) would set one flag everywhere).
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except Exception as err:
        # The input is attach's guess unless the caller gave one: say which, so a wrong one can be replaced.
        message = (f"mira.attach: a dry run of the {what} ({type(model).__name__}) on an input of shape "
                   f"{tuple(example_input.shape)} failed: {err}\nIf the model takes other inputs, pass "
                   f"example_input=<a batch it accepts>.")
        raise RuntimeError(f"{message}\n{_SUPPORTED}") from err
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training

    for name, _ in blocks:
        seen = calls[name]
        where = f"{name}.attn.qkv" if name else "attn.qkv"
        if not seen:
            raise RuntimeError(
                f"mira.attach: in a dry run of the {what}, {where} was never called by {type(model).__name__}'s "
                f"forward: its attention bypasses the module (e.g. F.linear on attn.qkv.weight), so an adapter "
                f"there would silently do nothing.\n{_SUPPORTED}"
            )
        if len(seen) > 1:
            raise RuntimeError(f"mira.attach: {where} is called {len(seen)} times per forward; expected once.\n"
                               f"{_SUPPORTED}")
        shape, same = seen[0]
        if len(shape) != 3 or shape[0] != batch:
            raise RuntimeError(
                f"mira.attach: {where} receives tokens of shape {shape} for a batch of {batch} images, not "
                f"per-image tokens (B, T, d): windowed or spatial attention has no per-image CLS token to "
                f"query with.\n{_SUPPORTED}"
            )
        if not same:
            raise RuntimeError(
                f"mira.attach: {where} does not receive the attention module's input, from which MIRA "
                f"makes its query.\n{_SUPPORTED}"
            )
    return {name: calls[name][0][0][1] for name, _ in blocks}, (patch_shape[0] if patch_shape else None)


def _patch_tokens(patch_shape: torch.Size | None, width: int) -> int | None:
    """How many patch tokens of width ``width`` the patch embedding made ((B, P, d) or NHWC
    (B, H, W, d)); None where its output is not such tokens (no patch_embed, NCHW maps)."""
    if patch_shape is None or patch_shape[-1] != width or len(patch_shape) not in (3, 4):
        return None
    return math.prod(patch_shape[1:-1])


def _slice_offsets(config: MiraConfig, out_features: int, where: str) -> tuple[tuple[int, ...], int, tuple | None]:
    if isinstance(config.slices[0], str):
        if out_features % 3:
            raise ValueError(f"{where}: named slices need a packed qkv with 3 equal parts, "
                             f"but it has {out_features} output features")
        width = out_features // 3
        offsets = tuple(SLICE_NAMES.index(s) * width for s in config.slices)
        names = tuple(config.slices)
        if config.slice_width is not None and config.slice_width != width:
            raise ValueError(f"{where}: slice_width={config.slice_width} disagrees with the qkv part width {width}")
    else:
        width, offsets, names = config.slice_width, tuple(config.slices), None
    for off in offsets:
        if off + width > out_features:
            raise ValueError(f"{where}: slice [{off}, {off + width}) lies outside the projection's "
                             f"{out_features} output features")
    return offsets, width, names


def _attach_config(config: MiraConfig | None, options: dict) -> MiraConfig:
    """The MiraConfig of an attach call: ``config`` or the keyword arguments (MiraConfig's fields)."""
    fields = [f.name for f in dataclasses.fields(MiraConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"attach() got unexpected keyword arguments {unknown}; MIRA options are MiraConfig's fields: "
                        f"{fields} (and example_input)")
    if options.get("eps", 0.0) is None:  # eps=None has always meant the default guard
        del options["eps"]
    if config is None:
        return MiraConfig(**options)
    if not isinstance(config, MiraConfig):
        raise TypeError(f"attach: config must be a mira.MiraConfig, got {type(config).__name__}")
    if options:
        raise TypeError(f"attach: pass the options either in the MiraConfig or as keyword arguments, not both "
                        f"(got config and {sorted(options)}); use dataclasses.replace(config, ...) to change a config")
    return config


def attach(
    model: nn.Module,
    config: MiraConfig | None = None,
    *,
    example_input: torch.Tensor | None = None,
    **options,
) -> nn.Module:
    """Insert MIRA into a timm Vision Transformer, in place.

    Every selected block gets ``block.mira_memory`` (an :class:`AdapterMemory`, empty, or with
    ``capacity`` pre-allocated slots; ``block.attn.mira_memory`` where the block is an
    nn.Sequential) and ``block.attn.qkv`` becomes a :class:`MiraProjection` wrapping the
    original linear layer. The whole backbone is frozen and the model is left in
    the ``adaptation`` stage (equal to the backbone until the LoRA trains).

    What to insert is a :class:`~mira.config.MiraConfig`, given as ``config`` (PEFT style:
    ``mira.attach(model, MiraConfig(rank=8))``) or as its fields in keyword arguments
    (``mira.attach(model, rank=8)``), not both. Defaults are MiraConfig's: the authors' semantics,
    keys normalised per feature before the cosine (``key_norm="per_feature"``) and drawn from
    U(-1, 1) (``key_init="uniform"``); ``key_norm="unit"`` is plain cosine retrieval.

    Two dry runs (``example_input``, a Tensor batch; default a random batch of 2 at the model's
    input size) check that the model's attention calls ``attn.qkv`` on per-image tokens equal to
    the attention input, and then that every installed wrapper is actually called; a model that
    fails either is restored and refused with an explanation.

    The token layout (the prefix tokens the ``"mean"`` query leaves out, the CLS token ``"cls"``
    takes) is read from the ViT's ``num_prefix_tokens`` and ``cls_token`` / ``has_class_token``
    as timm sets them; with neither ``num_prefix_tokens`` nor a CLS token it is unknown, and
    attach refuses the model unless each adapted block receives the patch embedding's tokens alone.

    Returns:
        ``model`` itself.
    """
    config = _attach_config(config, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach expects an nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        # The dry runs check the batch size of what each qkv receives against the input's (a list or
        # dict raised "'list' object has no attribute 'shape'" from inside them).
        raise TypeError(f"attach: example_input must be a torch.Tensor, a batch the model's forward takes as "
                        f"its one argument (images (B, C, H, W) for a ViT), or None for a random batch at the "
                        f"model's input size; got {type(example_input).__name__}")
    if projections(model):
        raise RuntimeError("mira.attach: this model already has MIRA layers (call mira.detach first)")
    found = _qkv_blocks(model)
    if not found:
        raise ValueError(f"mira.attach: found no block with an `attn.qkv` nn.Linear in {type(model).__name__}. "
                         f"{_SUPPORTED}")
    if config.blocks is None:
        chosen = found
    else:
        if not config.blocks:
            raise ValueError("mira.attach: blocks=() selects no block; pass None for every block")
        bad = [b for b in config.blocks if not -len(found) <= b < len(found)]
        if bad:
            raise IndexError(f"blocks {bad} out of range: the model has {len(found)} attention blocks")
        resolved = [b % len(found) for b in config.blocks]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"blocks {config.blocks} name the same block twice in a model of {len(found)} "
                             f"attention blocks (as {resolved})")
        chosen = [found[b] for b in sorted(resolved)]
    for name, block in chosen:
        if hasattr(_memory_owner(block), MEMORY_ATTR):
            raise RuntimeError(f"mira.attach: block {name!r} already has an attribute {MEMORY_ATTR!r}")

    vit = _vit_of(model, [name for name, _ in chosen])
    if example_input is None:
        example_input = _example_input(vit, batch=2)
    elif isinstance(example_input, torch.Tensor) and example_input.shape[0] == 1:
        # With one image, windowed attention over a single window would look per-image.
        example_input = torch.cat([example_input, example_input])
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    # timm's fx feature extraction keeps registered modules as leaves: the projection is then one
    # call, as the nn.Linear was. Here, not at import: timm is loaded by now (importing it costs ~0.9 s).
    from timm.layers import register_notrace_module
    register_notrace_module(MiraProjection)
    for _, block in chosen:
        families.fuse_qkv_bias(block.attn)  # BEiT / EVA: their qkv becomes a call of attn.qkv
    # Kept before installing, for detach, which undoes the freezing (set_stage below; MiraProjection
    # freezes each base layer it wraps): a failed install is undone by detach too, flags included
    # (recorded after it, a failed dry run left every wrapped qkv frozen).
    model.__dict__[_REQUIRES_GRAD_ATTR] = flags
    try:
        _install(model, vit, chosen, config, example_input)
    except Exception:
        detach(model)  # restores whatever was changed, the moved biases and the flags included
        raise
    set_stage(model, "adaptation")
    if not any(_hook_function(h) is _refuse_failing_load for h in model._load_state_dict_pre_hooks.values()):
        model.register_load_state_dict_pre_hook(_refuse_failing_load)
    return model


def _install(model: nn.Module, vit: nn.Module, chosen: list[tuple[str, nn.Module]], config: MiraConfig,
             example_input: torch.Tensor) -> None:
    token_counts, patch_shape = _probe(model, chosen, example_input, "original model")

    cls_token = getattr(vit, "cls_token", None)
    if cls_token is None:  # NaFlexVit keeps it in its embedding module
        cls_token = getattr(getattr(vit, "embeds", None), "cls_token", None)
    has_cls = getattr(vit, "has_class_token", None)  # timm's VisionTransformer and NaFlexVit say so
    if not isinstance(has_cls, bool):
        has_cls = cls_token is not None
    # Without num_prefix_tokens, the prefix is the cls_token's tokens (PiT: CLS and distillation in one (1, 2, d)).
    cls_tokens = cls_token.shape[-2] if isinstance(cls_token, torch.Tensor) and cls_token.dim() == 3 else 1
    num_prefix = getattr(vit, "num_prefix_tokens", cls_tokens if has_cls else None)
    # None: the model says nothing of its token layout. Taken as no prefix, CrossViT's CLS tokens
    # (cls_token_0, cls_token_1, one per branch) were averaged into the mean query.
    num_prefix = None if num_prefix is None else int(num_prefix)
    if num_prefix is None and not any("token" in n for n, _ in vit.named_parameters(recurse=False)):
        # No learned token of its own (Hiera, MViTv2 without a class token): every token is a patch or
        # pooled from patches. CrossViT's cls_token_0 / cls_token_1 keep its layout unknown.
        num_prefix = 0
    declare = (f"if token 0 of every adapted block is a CLS token, or its first N tokens are prefix tokens (CLS, "
               f"registers), set num_prefix_tokens = N (and has_class_token = True for a CLS token) on the "
               f"{type(vit).__name__} before attach, as timm's VisionTransformer has them")
    if config.query_token == "cls" and not has_cls:
        if num_prefix is None:
            raise ValueError(f"query_token='cls': mira.attach cannot tell whether {type(vit).__name__} has a CLS "
                             f"token: it has no cls_token, has_class_token or num_prefix_tokens attribute; {declare}")
        raise ValueError(f"query_token='cls' needs a CLS token, but {type(vit).__name__} has none "
                         "(e.g. class_token=False); use query_token='mean'")

    memory_configs = []
    for name, block in chosen:
        qkv = block.attn.qkv
        where = f"{name}.attn.qkv" if name else "attn.qkv"
        offsets, width, names = _slice_offsets(config, qkv.out_features, where)
        block_prefix = num_prefix
        patches = _patch_tokens(patch_shape, qkv.in_features)
        if num_prefix != 0 and token_counts[name] == patches:
            # The block sees the patch tokens alone (CaiT and XCiT add their CLS token only in the
            # class-attention blocks after it): its token 0 is a patch, and no token is a prefix.
            if config.query_token == "cls":
                raise ValueError(
                    f"query_token='cls': {where} receives the {patches} patch tokens of each image and no CLS "
                    f"token ({type(model).__name__} adds its CLS token only after these blocks), so token 0 "
                    f"is a patch; use query_token='mean'")
            block_prefix = 0
        elif num_prefix is None:
            seen = (f"they are not the {patches} tokens its patch embedding makes" if patches is not None
                    else "its patch embedding's output (the patch tokens alone) was not seen")
            raise ValueError(
                f"query_token='mean': mira.attach cannot tell which of the {token_counts[name]} tokens {where} "
                f"receives are patch tokens: {type(vit).__name__} has no num_prefix_tokens or cls_token attribute "
                f"and {seen}, so the mean could take in CLS tokens; {declare}")
        memory_configs.append((
            MemoryConfig(
                d_in=qkv.in_features, d_k=config.key_dim or qkv.in_features, num_slices=len(offsets),
                slice_width=width, rank=config.rank, query=config.query, query_token=config.query_token,
                query_hidden=config.query_hidden, separation=config.separation, key_norm=config.key_norm,
                key_init=config.key_init, capacity=config.capacity, trainable_bank=config.trainable_bank,
                bank_dtype=config.bank_dtype, scale=config.scale, eps=config.eps, num_prefix_tokens=block_prefix,
            ),
            offsets, names,
        ))

    for (_, block), (mem_config, offsets, names) in zip(chosen, memory_configs):
        qkv = block.attn.qkv
        owner = _memory_owner(block)
        # Ordinary parameters even when attach runs under torch.inference_mode: inference tensors
        # cannot be made trainable or written outside it (set_stage, write_adapters would fail).
        with torch.inference_mode(False):
            # The new modules in the mode of what they join (a block in eval inside a training model stays so).
            memory = AdapterMemory(mem_config, device=qkv.weight.device, dtype=qkv.weight.dtype).train(owner.training)
            setattr(owner, MEMORY_ATTR, memory)
            block.attn.qkv = MiraProjection(qkv, memory, offsets, slice_names=names).train(qkv.training)
    _probe(model, chosen, example_input, "model with MIRA installed")


def config_of(model: nn.Module) -> MiraConfig:
    """The :class:`~mira.config.MiraConfig` that attaches MIRA to a fresh copy of ``model`` as it is.

    Read back from the installed layers (blocks, slices, memory configs), so it also holds for
    models attached by older versions. Raises if the blocks were attached with different options.
    Widths that default to the block width (``key_dim``, ``query_hidden``) read back as None when
    every block has its own width there, so a model whose blocks differ in width (PiT) round-trips.
    """
    found = _qkv_blocks(model)
    adapted = [(i, block.attn.qkv) for i, (_, block) in enumerate(found) if isinstance(block.attn.qkv, MiraProjection)]
    if not adapted:
        raise RuntimeError("config_of: the model has no MIRA layers (call mira.attach first)")
    memory_configs = [proj.memory.config for _, proj in adapted]
    d_k = _width_option("key_dim", [(c.d_in, c.d_k) for c in memory_configs])
    query_hidden = _width_option("query_hidden", [(c.d_in, c.hidden_width) for c in memory_configs
                                                  if c.hidden_width is not None])
    configs = set()
    for (_, proj), c in zip(adapted, memory_configs):
        slices = proj.slice_names if proj.slice_names is not None else proj.slice_offsets
        configs.add((slices, None if proj.slice_names is not None else c.slice_width, c.rank, c.query, c.query_token,
                     c.separation, c.key_norm, c.key_init, c.capacity, c.trainable_bank, c.scale, c.eps, c.bank_dtype))
    if len(configs) > 1:
        raise ValueError(f"config_of: the blocks were attached with different options: {sorted(configs, key=str)}")
    (slices, slice_width, rank, query, query_token, separation, key_norm, key_init, capacity,
     trainable_bank, scale, eps, bank_dtype) = configs.pop()
    blocks = None if len(adapted) == len(found) else tuple(i for i, _ in adapted)
    return MiraConfig(rank=rank, slices=slices, slice_width=slice_width, query=query, query_token=query_token,
                      query_hidden=query_hidden, key_dim=d_k, separation=separation, key_norm=key_norm,
                      key_init=key_init, capacity=capacity, trainable_bank=trainable_bank, bank_dtype=bank_dtype,
                      scale=scale, eps=eps, blocks=blocks)


def _width_option(option: str, widths: list[tuple[int, int]]) -> int | None:
    """The attach option that gives every block its width: None (the block's own width, d_in) when
    that holds for each block, else the one fixed width they share. ``widths``: (d_in, width) per block."""
    if all(width == d_in for d_in, width in widths):
        return None
    fixed = {width for _, width in widths}
    if len(fixed) > 1:
        raise ValueError(f"config_of: the blocks were attached with different {option} values: "
                         f"{[width for _, width in widths]} for block widths {[d_in for d_in, _ in widths]}")
    return fixed.pop()


#: Where attach keeps every parameter's requires_grad as it found them (a dict name -> bool on the
#: model), so that detach can undo its freezing.
_REQUIRES_GRAD_ATTR = "_mira_requires_grad_before_attach"


def detach(model: nn.Module) -> nn.Module:
    """Remove every MIRA layer: restore the original ``attn.qkv``, delete the memories, and give
    every parameter back the ``requires_grad`` it had before :func:`attach` froze the backbone.

    Refused while a merged or folded update is held in the weights (:mod:`mira.merge`): take it
    out first (``mira.unmerge`` / ``mira.unfold``), or keep it with ``mira.unload``.
    """
    held = [p.merged_update.kind for p in projections(model) if p.merged_update is not None]
    if held:
        undo = "mira.unmerge" if held[0] == "merged" else "mira.unfold"
        raise RuntimeError(f"detach: the qkv weights hold a {held[0]} update, so detaching would not restore the "
                           f"backbone; call {undo}(model) first, or mira.unload(model) to keep the update")
    for _, block in _qkv_blocks(model):
        if isinstance(block.attn.qkv, MiraProjection):
            block.attn.qkv = block.attn.qkv.base_layer
        families.split_qkv_bias(block.attn)
        owner = _memory_owner(block)
        if isinstance(getattr(owner, MEMORY_ATTR, None), AdapterMemory):
            delattr(owner, MEMORY_ATTR)
    flags = model.__dict__.pop(_REQUIRES_GRAD_ATTR, None)
    if flags is not None:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
    for module in model.modules():
        hooks = module._load_state_dict_pre_hooks
        for key in [key for key, hook in hooks.items() if _hook_function(hook) is _refuse_failing_load]:
            del hooks[key]
    return model


# ----------------------------------------------------------------------------------------------
# load_state_dict: a call that would raise is refused before anything loads (contract section 9).
# nn.Module.load_state_dict copies module by module, parents first, and raises only at the end:
# every memory checks its own part (AdapterMemory._load_from_state_dict), but the modules before a
# refusing one had loaded by then. attach therefore registers _refuse_failing_load on the model
# it was given, which runs before any module below it loads and checks all of them as torch will.
# ----------------------------------------------------------------------------------------------


def _hook_function(hook):
    """The function of a load-state-dict pre-hook (torch wraps it: _WrappedHook; merge's are partials)."""
    hook = getattr(hook, "hook", hook)
    return getattr(hook, "func", hook)


def _load_order(module: nn.Module, keys: list[str], prefix: str = ""):
    """(module, prefix, the keys under prefix) in the order nn.Module.load_state_dict loads them: a
    module, then each child's subtree in turn; keys filtered per child as torch filters them."""
    yield module, prefix, keys
    for name, child in module._modules.items():
        if child is not None:
            child_prefix = prefix + name + "."
            yield from _load_order(child, [k for k in keys if k.startswith(child_prefix)], child_prefix)


def _local_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a module's own loader copies: its parameters and persistent buffers that are not None."""
    buffers = [(k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set]
    return {k: v for k, v in [*module._parameters.items(), *buffers] if v is not None}


def _copy_error(key: str, value, tensor: torch.Tensor) -> str | None:
    """nn.Module._load_from_state_dict's error for copying the entry ``value`` into ``tensor``, else None."""
    if not is_tensor_like(value):
        return (f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object from '
                f"checkpoint but received {type(value)}")
    if nn.parameter.is_lazy(tensor):
        return None
    shape = value.shape
    if tensor.dim() == 0 and len(shape) == 1 and shape[0] == 1:
        shape = torch.Size()  # torch's rule for checkpoints of PyTorch 0.3: a (1,) entry loads into a 0-dim tensor
    if shape != tensor.shape:
        return (f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, the shape in "
                f"current model is {tensor.shape}.")
    return None


_TORCH_LOADERS = (nn.Module._load_from_state_dict, AdapterMemory._load_from_state_dict,
                  MiraProjection._load_from_state_dict)  # mira's two add their refusals to torch's rule


def _loads_by_torchs_rule(module: nn.Module) -> bool:
    """Whether what a module loads is what nn.Module's loader would: no loader of its own (BatchNorm adds
    a missing num_batches_tracked) and no load pre-hook but mira's (FSDP's and lazy modules' change the
    entries, for the module and below it). The subtree of one that is not is left to torch."""
    if type(module)._load_from_state_dict not in _TORCH_LOADERS:
        return False
    return all(getattr(_hook_function(h), "__module__", "").startswith("mira.")
               for h in module._load_state_dict_pre_hooks.values())


def _load_call(module: nn.Module, state_dict, prefix: str):
    """Where the load_state_dict call that has reached ``module`` (at ``prefix``, its hooks running) stands.

    Returns:
        The module the call began at, its state dict and ``strict``; the keys it has copied already
        (the modules before ``module``: [] when it began there, None when the call cannot be found);
        and the (module, prefix, keys) it is still to load, ``module``'s subtree first, in order.
    """
    root, full, strict = _callers_load()
    if root is not None and full is not None:
        order = list(_load_order(root, list(full)))
        at = next((i for i, (m, p, _) in enumerate(order) if m is module and p == prefix), None)
        if at is not None:
            copied = [p + name for m, p, _ in order[:at] for name, t in _local_tensors(m).items()
                      if p + name in full and _copy_error(p + name, full[p + name], t) is None]
            return root, full, strict, copied, order[at:]
    return module, state_dict, strict, (None if prefix else []), list(_load_order(module, list(state_dict), prefix))


def _what_loaded(copied: list[str] | None, prefix: str) -> str:
    """What a call refused at ``prefix`` had loaded (``copied``, from :func:`_load_call`), for its message."""
    if copied == []:
        return "nothing was loaded"
    where = repr(prefix[:-1])
    if copied is None:
        return f"nothing from {where} on was loaded, but the call began above it: what loads before it may have loaded"
    listed = ", ".join(copied[:6]) + (f" and {len(copied) - 6} more" if len(copied) > 6 else "")
    return f"nothing from {where} on was loaded, but the call began above it and had already loaded {listed}"


def _refuse_failing_load(module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of the module attach was given: raises, before anything at or below it
    loads, when the call would raise, with torch's errors (and the memories' refusals).

    Checks what torch checks from here on, under the caller's ``strict`` (torch passes True here):
    entries that are not tensors or of another size, and with ``strict`` missing and unexpected keys;
    every memory's part by the memory's own rule (a growing memory takes another slot count); a
    projection holding a merged or folded update (mira.merge). Errors the call has collected already
    (modules before this one) raise now too. A module with a loader or load hook of its own is left
    to torch with its subtree (it may change the entries). A function given its module, so that a
    copy or a pickled model checks for itself; removed by detach.
    """
    from .merge import _refuse_load_while_held  # (mira.merge imports this module)

    _refuse_load_while_held(module, state_dict, prefix)
    root, full, strict, copied, remaining = _load_call(module, state_dict, prefix)
    errors, missing, unexpected = list(error_msgs), list(missing_keys), list(unexpected_keys)
    skip = memory = None  # prefixes of a subtree left to torch, of a memory's subtree
    for m, p, keys in remaining:
        if skip is not None and p.startswith(skip):
            continue
        if isinstance(m, AdapterMemory):
            refusal = m._load_refusal(full, p, strict)
            if refusal is not None:
                errors.append(refusal)
                skip = p
                continue
            memory = p
        if not _loads_by_torchs_rule(m):
            skip = p
            continue
        judged = memory is not None and p.startswith(memory)  # shapes and foreign entries: the memory's rule
        local = _local_tensors(m)
        for name, tensor in local.items():
            key = p + name
            if key not in full:
                if strict:
                    missing.append(key)
            elif (error := _copy_error(key, full[key], tensor)) and not (judged and is_tensor_like(full[key])):
                errors.append(error)
        extra = p + "_extra_state"
        if getattr(type(m), "set_extra_state", nn.Module.set_extra_state) is not nn.Module.set_extra_state:
            if extra not in full and strict:
                missing.append(extra)
        elif extra in full and strict:
            unexpected.append(extra)
        if strict and not judged:
            for key in keys:
                if key != extra:
                    head, *rest = key[len(p):].split(".", 1)
                    if head not in (m._modules if rest else local):
                        unexpected.append(key)
    if strict and unexpected:
        errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
    if strict and missing:
        errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if errors:
        loaded = _what_loaded(copied, prefix)
        if copied != []:
            loaded += "; load from the model MIRA is attached to, to be refused before anything loads"
        raise RuntimeError("Error(s) in loading state_dict for {}:\n\t{}\n\t(mira checked it before loading: {})"
                           .format(type(root).__name__, "\n\t".join(errors), loaded))


def _check_module(model) -> None:
    # Every function of this package that takes the model finds its MIRA parts through the two below:
    # a model name or a state dict raised "'str' object has no attribute 'modules'" from inside them.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the model MIRA is attached to), got {type(model).__name__}")


def projections(model: nn.Module) -> list[MiraProjection]:
    """Every :class:`MiraProjection` of ``model``, in module (block) order."""
    _check_module(model)
    return [m for m in model.modules() if isinstance(m, MiraProjection)]


def named_memories(model: nn.Module) -> list[tuple[str, AdapterMemory]]:
    """(qualified name, memory) pairs in block order; the names key the save files."""
    _check_module(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterMemory)]


def memories(model: nn.Module) -> list[AdapterMemory]:
    """Every :class:`AdapterMemory` of ``model``, in block order."""
    return [m for _, m in named_memories(model)]


def _stage_parameters(model: nn.Module, stage: str) -> list[nn.Parameter]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    params: list[nn.Parameter] = []
    if stage == "adaptation":
        for p in projections(model):
            params += [p.lora_a, p.lora_b]
    elif stage == "consolidation":
        for m in memories(model):
            params.append(m.keys)
            params += list(m.query_module.parameters())
            if m.config.trainable_bank:
                params += [m.bank_a, m.bank_b]
    return params


def trainable_parameters(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """The MIRA parameters ``stage`` trains (adaptation: the LoRAs; consolidation: keys, query
    modules, and the banks if trainable; inference: none). Does not change ``requires_grad``."""
    return _stage_parameters(model, stage)


def set_stage(model: nn.Module, stage: str, *, extra_trainable: Iterable[str] = ()) -> nn.Module:
    """Switch every MIRA layer to ``stage`` and set ``requires_grad`` accordingly.

    Everything is frozen except :func:`trainable_parameters` of the stage and the parameters of
    the modules named in ``extra_trainable`` (qualified names such as ``"head"``; the paper trains
    a linear head in both training stages). Train/eval mode (dropout) is left to the caller.

    Returns:
        ``model``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if not projections(model):
        raise RuntimeError("set_stage: the model has no MIRA layers (call mira.attach first)")
    for proj in projections(model):
        proj.check_stage(stage)  # before anything changes
    if isinstance(extra_trainable, str):
        raise TypeError(f"extra_trainable takes a sequence of module names, e.g. ({extra_trainable!r},), "
                        f"not the string {extra_trainable!r}")
    if not isinstance(extra_trainable, Iterable):  # None, an int: "'NoneType' object is not iterable"
        raise TypeError(f"set_stage: extra_trainable takes a sequence of module names, e.g. ('head',), or () for "
                        f"none, got {type(extra_trainable).__name__} {extra_trainable!r}")
    modules = dict(model.named_modules())
    extra = []
    for name in extra_trainable:
        if name not in modules:
            raise KeyError(f"extra_trainable: the model has no module named {name!r}")
        if any(isinstance(m, (MiraProjection, AdapterMemory)) for m in modules[name].modules()):
            raise ValueError(f"extra_trainable: {name!r} contains MIRA layers; name a module outside them "
                             "(a frozen base projection cannot train)")
        # A module inside a projection (its base_layer: unfrozen, the fused op refused the next forward)
        # or inside a memory (its query module, which the stage itself decides to train or not).
        owner = _mira_part_owner(modules, name)
        if owner is not None:
            raise ValueError(f"extra_trainable: {name!r} is part of the MIRA layer {owner!r}, whose parameters the "
                             "stage sets (a base projection is frozen: the fused op gives it no gradient); name a "
                             "module outside the MIRA layers")
        extra.append(modules[name])
    model.requires_grad_(False)
    for p in _stage_parameters(model, stage):
        p.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)
    for p in projections(model):
        p.set_stage(stage)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Element counts of the backbone and of each MIRA part, the stored adapters included.

    Returns:
        ``backbone``: every parameter outside MIRA (the head included), as the model had them before
        attach: BEiT / EVA count their q and v biases, not the fused qkv bias attach made of them,
        which also holds k's zero bias (a buffer of the backbone).
        ``keys``, ``query`` (query modules), ``bank`` (the stored adapter values: buffers, or
        parameters with ``trainable_bank``; every allocated slot of a fixed-capacity memory),
        ``lora`` (the live adaptation adapters).
        ``added``: keys + query + bank, what MIRA adds to a served model (the live LoRA does not
        run in inference and is left out; it is in ``total``); ``added_bytes``: its size in
        bytes in the tensors' dtypes.
        ``total``: backbone + keys + query + bank + lora.
        ``trainable``: parameters with requires_grad now.
    """
    mira_ids = set()
    counts = dict.fromkeys(("keys", "query", "bank", "lora"), 0)
    added_bytes = 0
    for m in memories(model):
        query_params = list(m.query_module.parameters())
        counts["keys"] += m.keys.numel()
        counts["bank"] += m.bank_a.numel() + m.bank_b.numel()
        counts["query"] += sum(p.numel() for p in query_params)
        added_bytes += sum(t.numel() * t.element_size() for t in (m.keys, m.bank_a, m.bank_b, *query_params))
        mira_ids.update(id(p) for p in m.parameters())
    for p in projections(model):
        counts["lora"] += p.lora_a.numel() + p.lora_b.numel()
        mira_ids.update((id(p.lora_a), id(p.lora_b)))
    params = list(model.parameters())
    counts["backbone"] = sum(p.numel() for p in params if id(p) not in mira_ids) - families.fused_surplus(model)
    counts["added"] = counts["keys"] + counts["query"] + counts["bank"]
    counts["added_bytes"] = added_bytes
    counts["total"] = counts["backbone"] + counts["added"] + counts["lora"]
    counts["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    return counts


def write_adapters(
    model: nn.Module,
    keys: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    task: str | None = None,
    generator: torch.Generator | None = None,
    reset: bool = True,
) -> list[int]:
    """Append every block's current LoRA to its memory, then re-initialise the LoRA.

    Args:
        keys: None (a random key per block, drawn from ``generator`` as the memory's ``key_init``
            says: U(-1, 1) by default), one (d_k,) key used by
            every block, or a sequence with one key per memory.
        task: the name of the new slots (``"sketch"``); a task may store several adapters.
            Listed by :func:`mira.task_slots`, removed or selected by name, saved with the memories.
        reset: re-initialise the LoRA afterwards (A kaiming-uniform, B zero) for the next run.

    Returns:
        The slot index of the new adapter in each memory (block order).

    A growing memory (``capacity=None``) changes the shape of its ``keys`` Parameter: drop an
    optimiser's state for it afterwards (``AdapterMemory.forget_optimizer_state``) or build a new
    optimiser. A fixed-capacity memory keeps every shape.
    """
    projs = projections(model)
    if not projs:
        raise RuntimeError("write_adapters: the model has no MIRA layers (call mira.attach first)")
    if keys is None or isinstance(keys, torch.Tensor):
        per_block = [keys] * len(projs)
    elif isinstance(keys, torch.Generator):
        raise TypeError("write_adapters: keys got a torch.Generator; pass it as generator=")
    else:
        if not isinstance(keys, Sequence):
            raise TypeError(f"write_adapters: keys must be None, a Tensor or a sequence of one per memory, got "
                            f"{type(keys).__name__}")
        per_block = list(keys)
        if len(per_block) != len(projs):
            raise ValueError(f"got {len(per_block)} keys for {len(projs)} memories")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"write_adapters: generator must be a torch.Generator or None, got {type(generator).__name__}")
    # Check every block's key (and room) and draw the fresh LoRAs before any memory changes, so a
    # failure (a generator on another device, say) changes nothing. The draws keep their order: the
    # keys, then each block's LoRA A.
    with _restored_on_error(generator):
        prepared = [proj.memory._prepare_append(proj.lora_a, proj.lora_b, key, generator=generator, names=task)
                    for proj, key in zip(projs, per_block)]
        fresh = [proj._fresh_lora_a(generator) for proj in projs] if reset else [None] * len(projs)
    slots = []
    for proj, values in zip(projs, prepared):
        (slot,) = proj.memory._commit_append(*values)
        slots.append(slot)
    for proj, lora_a in zip(projs, fresh):
        if lora_a is not None:
            proj._set_lora(lora_a)
    return slots


@contextlib.contextmanager
def _restored_on_error(generator: torch.Generator | None):
    """Puts ``generator`` back where it was if the block raises: a failed call draws nothing."""
    state = generator.get_state() if generator is not None else None
    try:
        yield
    except BaseException:
        if generator is not None:
            generator.set_state(state)
        raise


@torch.no_grad()
def _mira_part_owner(modules: dict[str, nn.Module], name: str) -> str | None:
    """The name of the MIRA layer (projection or memory) that module ``name`` lies inside, or None.
    ``modules``: the model's ``dict(named_modules())``."""
    return next((p for p, m in modules.items()
                 if isinstance(m, (MiraProjection, AdapterMemory)) and name.startswith(p + ".")), None)


def _refuse_held_update(projs, what: str) -> None:
    """Raise if a projection holds a merged or folded update: its memory does not run then."""
    if any(p.merged_update is not None for p in projs):
        raise RuntimeError(f"{what}: the model holds a merged or folded update, so its memories do not run; "
                           "unmerge / unfold first")


def association_matrices(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``inputs`` and return every memory's association matrix.

    Returns:
        {memory name: (B, num_slots) weights}, the weights the consolidation / inference forward
        uses, from each block's attention input in that forward: called in the adaptation stage, the
        projections run their memories for this call (their stages are restored after). A model
        holding a merged or folded update is refused (its memories do not run).
    """
    projs = projections(model)
    if not projs:
        raise RuntimeError("association_matrices: the model has no MIRA layers (call mira.attach first)")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"association_matrices: inputs must be a batch the model takes (a Tensor of images), got "
                        f"{type(inputs).__name__}")
    # Block 0's weights would be right and every later block's taken from the update's outputs.
    _refuse_held_update(projs, "association_matrices")
    names = {id(m): n for n, m in named_memories(model)}
    results: dict[str, torch.Tensor] = {}
    handles = []
    for proj in projs:
        def hook(module, args, proj=proj):
            results[names[id(proj.memory)]] = proj.memory.get_association_matrix(tokens=args[0])

        handles.append(proj.register_forward_pre_hook(hook))
    # The memories' forward in every block: in the adaptation stage each block ran its live LoRA, so
    # every block after the first saw other inputs than the inference forward's (weights off by 2.5).
    stages = [p.stage for p in projs]
    try:
        for p in projs:
            p.set_stage("inference")
        model(inputs)
    finally:
        for p, stage in zip(projs, stages):
            p.set_stage(stage)
        for h in handles:
            h.remove()
    return results
