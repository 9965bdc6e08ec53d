"""timm attention families whose qkv projection is not a plain call of ``attn.qkv``.

BEiT, EVA / EVA-02 with a fused qkv (``eva02_tiny``, ``eva02_small``, EVA-01) and SwinV2 keep
the q and v biases as separate parameters (k's is a zero buffer) and compute
``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``, which bypasses any module installed
at ``attn.qkv``. Their forward calls ``self.qkv(x)`` instead when ``q_bias is None``. So
:func:`fuse_qkv_bias` moves the concatenated bias into ``attn.qkv`` (an ``nn.Linear`` with that
bias and the same weight Parameter) and sets the three bias attributes to None: the same
arithmetic, through a module MIRA can wrap, and no model code copied. :func:`split_qkv_bias`
puts them back (``mira.detach``). ``attach``'s dry runs still check that the wrapper is called
on per-image tokens (SwinV2, windowed, is refused there).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["fuse_qkv_bias", "fused_surplus", "split_qkv_bias"]

_FUSED_MARK = "_mira_fused_qkv_bias"


def _has_split_bias(attn: nn.Module) -> bool:
    qkv = getattr(attn, "qkv", None)
    return (
        isinstance(qkv, nn.Linear) and qkv.bias is None
        and isinstance(getattr(attn, "q_bias", None), torch.Tensor)
        and isinstance(getattr(attn, "v_bias", None), torch.Tensor)
        and isinstance(getattr(attn, "k_bias", None), torch.Tensor)
        and not getattr(attn, "qkv_bias_separate", False)  # that variant already calls self.qkv(x)
    )


@torch.no_grad()
def fuse_qkv_bias(attn: nn.Module) -> bool:
    """Move ``attn``'s separate q/k/v biases into ``attn.qkv``; returns whether it did."""
    if not _has_split_bias(attn):
        return False
    qkv = attn.qkv
    bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]).detach().clone()
    if bias.shape != (qkv.out_features,):
        return False
    # In the mode of the module it replaces (nn.Linear starts in train: a qkv in an eval model was not).
    fused = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device="meta").train(qkv.training)
    fused.weight = qkv.weight  # the same Parameter: nothing of the backbone is copied
    fused.bias = nn.Parameter(bias, requires_grad=attn.q_bias.requires_grad)
    # The originals, unregistered, for split_qkv_bias to put back: the very Parameters (an optimiser
    # or a reference made before attach still names the model's own) and the module (its hooks).
    originals = (qkv, attn.q_bias, attn.k_bias, attn.v_bias)
    attn.qkv = fused
    attn.q_bias = attn.k_bias = attn.v_bias = None
    object.__setattr__(attn, _FUSED_MARK, originals)
    return True


@torch.no_grad()
def split_qkv_bias(attn: nn.Module) -> None:
    """Undo :func:`fuse_qkv_bias` (no-op for an attention it did not change)."""
    originals = attn.__dict__.pop(_FUSED_MARK, None)
    if not originals:
        return
    if originals is True:  # marked by an older version, which kept no originals
        plain = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=False, device="meta")
        originals = (plain, None, None, None)
    qkv = attn.qkv
    d = qkv.out_features // 3
    bias = qkv.bias.detach()
    plain, q_bias, k_bias, v_bias = originals
    plain.weight = qkv.weight  # the current Parameter (the same one unless it was replaced)
    plain.train(qkv.training)  # the mode of the module it replaces, set (model.train / eval) while unregistered
    attn.qkv = plain
    # The values the fused bias holds now (loaded, converted to another dtype or device while
    # attached), put into the original tensors in place of theirs, as nn.Module.to does.
    for name, original, value in (("q_bias", q_bias, bias[:d]), ("k_bias", k_bias, bias[d: 2 * d]),
                                  ("v_bias", v_bias, bias[2 * d:])):
        value = value.clone()
        if original is None:
            original = value if name == "k_bias" else nn.Parameter(value)
        else:
            original.data = value
        if isinstance(original, nn.Parameter):
            original.requires_grad_(qkv.bias.requires_grad)
        setattr(attn, name, original)  # k_bias: a (non-persistent) buffer, as timm registers it


def fused_surplus(model: nn.Module) -> int:
    """Elements the fused biases of ``model`` hold as Parameters that the backbone held otherwise:
    k's zero bias, a buffer of the backbone, is a third of each. ``count_parameters`` takes them
    off, so the backbone counts as the model did before attach."""
    surplus = 0
    for module in model.modules():
        originals = module.__dict__.get(_FUSED_MARK)
        if originals is True:  # marked by an older version: q and v Parameters, k a buffer
            surplus += module.qkv.out_features // 3
        elif originals:
            surplus += sum(t.numel() for t in originals[1:] if not isinstance(t, nn.Parameter))
    return surplus
