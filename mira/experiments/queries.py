"""``query_source="backbone"``: every block's query is the frozen backbone's final feature of the image.

The paper's query is each block's own CLS token after LN1. In block 0 that token has not attended
to the image yet, so it is the same vector for every input (results/experiments/README.md): block 0
cannot route. Prompt-pool methods (L2P, DualPrompt, CODA-Prompt) query their pools with the frozen
pre-trained model's final feature instead, which costs one adapter-free forward per batch. This
module gives MIRA that query as a named option of the recipe, so the two can be compared.

:func:`use_backbone_query` wraps each memory's query module: the wrapper ignores the pooled block
tokens it is given and feeds the backbone's pre-logit feature of the same images to the original
query module (identity or MLP, still trained in consolidation). The feature is computed lazily,
once per forward, from the images captured by a forward pre-hook on the model's patch embedding
(the first module every forward path runs, ``model(x)`` and ``model.forward_features(x)`` alike).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import mira

__all__ = ["BackboneFeatures", "BackboneQuery", "use_backbone_query"]


class BackboneFeatures:
    """The frozen backbone's (B, embed_dim) pre-logit features of the images of the current forward."""

    def __init__(self, backbone: nn.Module, entry: nn.Module):
        self.backbone = backbone
        self._images: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        self.handle = entry.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._images, self._features = args[0], None

    def features(self, like: torch.Tensor) -> torch.Tensor:
        """Features of the captured images, in ``like``'s dtype and device (``like``: the pooled tokens)."""
        if self._images is None or self._images.shape[0] != like.shape[0]:
            raise RuntimeError("backbone query: no images of this batch were captured; the model must be "
                               "called on images (model(x) or model.forward_features(x))")
        if self._features is None:
            with torch.no_grad():
                feats = self.backbone.forward_features(self._images)
                self._features = self.backbone.forward_head(feats, pre_logits=True)
        return self._features.to(device=like.device, dtype=like.dtype)


class BackboneQuery(nn.Module):
    """Query module: ``inner`` applied to the backbone's feature of the image (the block's tokens unused)."""

    def __init__(self, inner: nn.Module, source: BackboneFeatures):
        super().__init__()
        self.inner = inner
        # A tuple, not an attribute nn.Module registers: the backbone's parameters must not become
        # this model's (optimisers, DualGPM and state dicts walk the module tree).
        self._source = (source,)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.inner(self._source[0].features(pooled))


def use_backbone_query(model: nn.Module, backbone: nn.Module) -> BackboneFeatures:
    """Make every memory of ``model`` (MIRA attached) query with ``backbone``'s final feature of the image.

    ``backbone``: the frozen pre-trained model ``model`` was copied from (same input, same width).
    """
    width = getattr(backbone, "embed_dim", None)
    source = BackboneFeatures(backbone, model.patch_embed)
    for mem in mira.memories(model):
        if width is not None and mem.config.d_in != width:
            raise ValueError(f"backbone query: the backbone's feature width {width} is not the memory's "
                             f"query input width {mem.config.d_in}")
        mem.query_module = BackboneQuery(mem.query_module, source)
    return source
