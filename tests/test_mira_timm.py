"""MIRA on timm Vision Transformers: attach, stages, dry-run refusal, compile."""

from __future__ import annotations

import pytest
import timm
import torch

import mira

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

IMG = 32


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": IMG, "patch_size": 8, "num_classes": 5, **kwargs}
    return timm.create_model(kwargs.pop("name", "vit_tiny_patch16_224"), pretrained=False, **kwargs).eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_attached_model_equals_backbone_at_init_and_with_empty_memory():
    backbone = tiny_vit()
    x = images()
    with torch.no_grad():
        expected = backbone(x)
    model = mira.attach(tiny_vit())
    assert len(mira.memories(model)) == len(model.blocks) == len(mira.projections(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        mira.set_stage(model, "consolidation")
        assert all(m.num_slots == 0 for m in mira.memories(model))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
