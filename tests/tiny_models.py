"""The tiny timm ViT the layer-level tests attach MIRA to, its images, and a PEFT LoRA on it."""

from __future__ import annotations

import pytest
import timm
import torch

IMG, WIDTH = 32, 192


def tiny_vit(depth=2, num_classes=5):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8,
                             num_classes=num_classes, depth=depth).eval()


def filled_vit(seed=3, n=2, *, move_query=False, **attach_args):
    """An attached tiny ViT whose memories hold ``n`` adapters written with non-zero LoRA B, the live
    LoRA B non-zero too; ``move_query``: the query modules' parameters moved off their init."""
    import mira

    model = mira.attach(tiny_vit(), **attach_args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
            mira.write_adapters(model, generator=g)
        for p in mira.projections(model):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
        for m in mira.memories(model) if move_query else ():
            for p in m.query_module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def peft_vit(tmp_path, *, k_rows_zero=True, **lora):
    """A PEFT LoRA on timm's packed qkv, with random B (PEFT initialises B to zero)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_vit(), peft.LoraConfig(target_modules=["qkv"], **lora))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("attn.qkv"):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.3)
                if k_rows_zero:
                    weight[WIDTH:2 * WIDTH] = 0
    model.save_pretrained(tmp_path)
    return model.eval()
