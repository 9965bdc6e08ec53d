"""timm families beyond the plain ViT: BEiT and EVA-02 (fused qkv), whose q/v biases attach moves into attn.qkv."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import mira

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

FAMILIES = {
    "beit": ("beit_base_patch16_224", {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),
}


def make(family):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # timm initialises the q/v biases to zero: make them matter
        for block in model.blocks:
            block.attn.q_bias.normal_(0, 0.5)
            block.attn.v_bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attach_wraps_the_qkv_of_beit_and_eva02_and_detach_restores_them(family):
    model = make(family)
    x = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    mira.attach(model, separation="softmax")  # one stored slot gets weight 1
    attn = model.blocks[0].attn
    assert isinstance(attn.qkv, mira.MiraProjection) and attn.q_bias is None and attn.v_bias is None
    torch.testing.assert_close(attn.qkv.bias[: attn.qkv.out_features // 3], before["blocks.0.attn.q_bias"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # the biases still apply
        for p in mira.projections(model):
            p.lora_b.normal_(0, 0.2)
        mira.write_adapters(model)
        mira.set_stage(model, "inference")
        # The stored adapters act on the qkv projection (the backbone's head and layer scales are tiny at init).
        seen = []
        handle = attn.qkv.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
        model(x)
        handle.remove()
        tokens, out = seen[0]
        base = attn.qkv.base_layer(tokens)
        assert (out - base).abs().max() > 1e-2 * base.abs().max()
    mira.detach(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert isinstance(attn.q_bias, nn.Parameter) and "k_bias" in attn._non_persistent_buffers_set
    assert type(attn.qkv) is nn.Linear and attn.qkv.bias is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# CaiT and XCiT run their self-attention blocks on the patch tokens alone: the CLS token joins only
# in the class-attention blocks after them (separate q/k/v projections, not adapted).
PATCH_TOKENS_ONLY = {
    "cait": ("cait_xxs24_224", {"img_size": 32, "depth": 2}),
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}),
}


@pytest.mark.parametrize("family", sorted(PATCH_TOKENS_ONLY))
def test_blocks_that_see_no_cls_token_refuse_a_cls_query_and_average_every_token(family):
    name, kwargs = PATCH_TOKENS_ONLY[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Token 0 of these blocks' input is a patch: a "cls" query would silently be that patch.
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv receives the \d+ patch tokens.*no CLS token.*'mean'"):
        mira.attach(model)
    assert not mira.projections(model) and sorted(model.state_dict()) == sorted(before)
    mira.attach(model, query_token="mean")
    seen = []
    handle = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    memory = model.blocks[0].mira_memory
    assert memory.config.num_prefix_tokens == 0  # every token is a patch: none is left out of the mean
    torch.testing.assert_close(memory.make_query(seen[0]), seen[0].mean(1))


def test_parallel_vit_branches_hold_their_memory_in_the_attention():
    # vit_*_18x2: every block runs two attention branches, each an nn.Sequential(norm, attn, ls,
    # drop_path) that calls every child in turn: a memory held by the branch would be called as a layer.
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, num_classes=5, img_size=32,
                              patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    mira.attach(model)
    assert [n for n, _ in mira.named_memories(model)] == [
        f"blocks.{b}.attns.{i}.attn.mira_memory" for b in range(2) for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        for p in mira.projections(model):
            p.lora_b.normal_(0, 0.2)
    mira.write_adapters(model)
    mira.set_stage(model, "inference")
    qkv = model.blocks[1].attns[1].attn.qkv
    seen = []
    handle = qkv.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(x)
        handle.remove()
        tokens, out = seen[0]
        assert (out - qkv.base_layer(tokens)).abs().max() > 1e-3  # the stored adapters act
    mira.detach(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not mira.memories(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detach_gives_back_the_very_bias_parameters_and_qkv_module_with_their_current_values(family):
    model = make(family)
    attn = model.blocks[0].attn
    qkv, params, q_bias = attn.qkv, dict(model.named_parameters()), attn.q_bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made before attach, used after detach
    mira.attach(model)
    with torch.no_grad():  # changed while attached (a load, a conversion): detach keeps the change
        attn.qkv.base_layer.bias.add_(1.0)
    model.double()
    mira.detach(model)
    assert attn.qkv is qkv and set(dict(model.named_parameters())) == set(params)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert attn.q_bias.dtype == torch.float64 and attn.k_bias.dtype == torch.float64
    torch.testing.assert_close(attn.q_bias.detach(), q_bias.double() + 1.0)
    assert torch.equal(attn.k_bias, torch.ones_like(attn.k_bias))  # timm's zero k bias, moved by the add above
    x = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    model(x).square().mean().backward()
    before = attn.v_bias.detach().clone()
    optimizer.step()
    assert not torch.equal(attn.v_bias, before)  # the optimizer still trains the model's own biases


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_backbone_count_of_beit_and_eva02_is_the_plain_models(family):
    # attach makes each fused qkv bias of q_bias, k's zero *buffer* and v_bias: counted as it is,
    # the backbone grew by one block width per adapted block, and so did print_trainable_parameters'
    # "% of backbone" column's whole.
    plain = sum(p.numel() for p in make(family).parameters())
    model = mira.attach(make(family))
    assert mira.count_parameters(model)["backbone"] == plain
    assert f"{'backbone':<28}{plain:>14,d}" in mira.parameter_summary(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_moved_qkv_modules_take_the_mode_of_the_module_they_replace(family):
    # The fused qkv was a fresh nn.Linear (train mode) in an eval model; detach put back the original
    # qkv in the mode it had at attach, though model.train() had been called since.
    model = make(family)
    mira.attach(model)
    assert [n for n, m in model.named_modules() if m.training] == []
    model.train()
    mira.detach(model)
    assert [n for n, m in model.named_modules() if not m.training] == []
    model.eval()
    mira.attach(model)
    model.train()
    mira.detach(model.eval())
    assert [n for n, m in model.named_modules() if m.training] == []


def crossvit():
    torch.manual_seed(0)
    return timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5, embed_dim=(16, 32),
                             depth=((1, 1, 0),), num_heads=(2, 2)).eval()


def test_a_model_that_declares_no_token_layout_is_refused_unless_its_layout_is_set():
    # CrossViT holds its CLS tokens as cls_token_0 and cls_token_1 (one per branch) and its patch
    # embeddings in a ModuleList: read as "no prefix", the mean query averaged the CLS token in, and
    # "cls" was refused as if the model had none.
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    model = crossvit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"query_token='cls': mira\.attach cannot tell whether CrossVit has a CLS "
                                         r"token.*set num_prefix_tokens = N \(and has_class_token = True"):
        mira.attach(model, example_input=x)
    with pytest.raises(ValueError, match=r"query_token='mean': mira\.attach cannot tell which of the 401 tokens "
                                         r"blocks\.0\.blocks\.0\.0\.attn\.qkv receives are patch tokens"):
        mira.attach(model, query_token="mean", example_input=x)
    assert not mira.projections(model) and not mira.memories(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # The cure the message names: one CLS token before the patch tokens of every branch.
    model.num_prefix_tokens = 1
    mira.attach(model, query_token="mean", example_input=x)
    seen = []
    handles = [p.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for p in mira.projections(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert [tuple(t.shape) for t in seen] == [(2, 401, 16), (2, 197, 32)]
    for memory, tokens in zip(mira.memories(model), seen, strict=True):
        patches = tokens[:, 1:]  # the CLS token left out
        pooled = patches.sum(1) / patches.shape[1]
        torch.testing.assert_close(memory.make_query(tokens), memory.query_module(pooled))


def test_a_model_without_learned_tokens_or_a_declared_layout_takes_the_mean_over_every_token():
    # Hiera has no CLS token and declares no layout, and its later stages see pooled tokens (fewer
    # than its patch embedding makes): with no learned token of its own, no token is a prefix.
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, num_classes=3, stages=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    mira.attach(model, query_token="mean", example_input=x)
    assert len(mira.memories(model)) == 4
    assert all(m.config.num_prefix_tokens == 0 for m in mira.memories(model))


def test_naflexvit_with_a_class_token_takes_the_cls_query():
    # NaFlexVit keeps its CLS token at embeds.cls_token and says has_class_token=True: "cls" was refused.
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_par_gap", pretrained=False, num_classes=5, img_size=32,
                              depth=1, embed_dim=32, num_heads=2, class_token=True).eval()
    mira.attach(model)
    memory = mira.memories(model)[0]
    assert memory.config.query_token == "cls" and memory.config.num_prefix_tokens == model.num_prefix_tokens == 5
    with pytest.raises(ValueError, match="has none"):
        torch.manual_seed(0)
        mira.attach(timm.create_model("naflexvit_base_patch16_par_gap", pretrained=False, num_classes=5, img_size=32,
                                      depth=1, embed_dim=32, num_heads=2, class_token=False).eval())
