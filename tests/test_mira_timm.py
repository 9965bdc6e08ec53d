"""MIRA on timm Vision Transformers: attach, dry-run refusal, stages, write_adapters, compile."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import mira
import mira_kernels

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

IMG = 32


def tiny_vit(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": IMG, "patch_size": 8, "num_classes": 5, **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(batch=3, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fill_loras(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mira.projections(model):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * std)


def test_attached_model_equals_backbone_at_init_and_with_empty_memory():
    backbone = tiny_vit(depth=4)
    x = images()
    with torch.no_grad():
        expected = backbone(x)
    for capacity in (None, 4):
        model = mira.attach(tiny_vit(depth=4), capacity=capacity)
        assert len(mira.memories(model)) == len(model.blocks) == len(mira.projections(model))
        assert all(isinstance(b.attn.qkv, mira.MiraProjection) for b in model.blocks)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
            mira.set_stage(model, "consolidation")
            assert all(m.num_slots == 0 for m in mira.memories(model))
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("capacity", [None, 4])
def test_attach_to_a_model_built_on_the_meta_device_then_load_a_checkpoint(capacity):
    # The large-model pattern: build without memory, attach, materialise, load the weights. attach's
    # dry run drew its input with a generator, which the meta device has none of, and failed there.
    real = mira.attach(tiny_vit(depth=2), capacity=capacity)
    for memory in mira.memories(real):
        c = memory.config
        g = torch.Generator().manual_seed(3)
        memory.append(torch.randn(3, c.num_slices, c.rank, c.d_in, generator=g),
                      torch.randn(3, c.num_slices, c.slice_width, c.rank, generator=g), generator=g)
    fill_loras(real)
    with torch.device("meta"):
        model = tiny_vit(depth=2)
    mira.attach(model, capacity=capacity)
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    for m in (real, model):
        mira.set_stage(m, "inference")
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), real(x))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_small_patch16_224", {"depth": 2}),
        ("vit_base_patch16_224", {"depth": 1}),
        ("deit_tiny_patch16_224", {"depth": 2}),
        ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    ],
)
def test_supported_timm_vits(name, kwargs):
    backbone, model = tiny_vit(name, **kwargs), tiny_vit(name, **kwargs)
    mira.attach(model, query="mlp", key_dim=32, query_token="mean")
    fill_loras(model)
    mira.write_adapters(model)
    x = images(2)
    with torch.no_grad():
        mira.set_stage(model, "inference")
        changed = (model(x) - backbone(x)).abs().max()
    assert changed > 1e-4  # the stored adapters act
    # Means exclude every prefix token (CLS, distillation).
    memory = mira.memories(model)[0]
    tokens = torch.randn(2, 5 + model.num_prefix_tokens, model.embed_dim)
    pooled = tokens[:, model.num_prefix_tokens:].mean(1)
    torch.testing.assert_close(memory.make_query(tokens), memory.query_module(pooled))


def test_mean_query_for_models_without_cls_token_and_chosen_blocks():
    kwargs = {"class_token": False, "reg_tokens": 2, "global_pool": "avg", "depth": 3}
    with pytest.raises(ValueError, match="use query_token='mean'"):
        mira.attach(tiny_vit(**kwargs))
    model = mira.attach(tiny_vit(**kwargs), query_token="mean", blocks=(0, -1))
    assert [m.config.num_prefix_tokens for m in mira.memories(model)] == [2, 2]
    names = [n for n, _ in mira.named_memories(model)]
    assert names == ["blocks.0.mira_memory", "blocks.2.mira_memory"]
    assert not isinstance(model.blocks[1].attn.qkv, mira.MiraProjection)


def small(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: small("eva02_base_patch14_224", img_size=28, depth=1, embed_dim=32, num_heads=2), "found no block"),
        (lambda: small("swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                       num_heads=(1, 1)), "windowed"),
        (lambda: small("samvit_base_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       window_size=2, global_attn_indexes=(1,), neck_chans=8, use_rel_pos=False), "windowed"),
        (lambda: small("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                       num_heads=(1, 1)), "windowed"),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "found no block"),
    ],
    ids=["eva02-separate-qkv", "swinv2", "sam", "swin", "no-blocks"],
)
def test_attach_refuses_unsupported_models_and_leaves_them_untouched(make, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((RuntimeError, ValueError), match=message) as info:
        mira.attach(model)
    assert "mira.attach supports timm Vision Transformers" in str(info.value)
    assert not mira.projections(model) and not mira.memories(model)
    assert sorted(model.state_dict()) == sorted(before)  # SwinV2's q/v biases moved into qkv and back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _CachedQkvAttention(nn.Module):
    """An attention that calls its qkv through a reference taken at construction time, so a
    wrapper installed later at ``attn.qkv`` is bypassed (the original layer still runs)."""

    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        object.__setattr__(self, "_qkv_call", self.qkv)

    def forward(self, x, **kwargs):
        q, k, v = self._qkv_call(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def test_attach_verifies_every_installed_wrapper_is_called():
    model = tiny_vit(depth=2)
    model.blocks[1].attn = _CachedQkvAttention(model.embed_dim)
    with pytest.raises(RuntimeError, match=r"model with MIRA installed, blocks\.1\.attn\.qkv was never called"):
        mira.attach(model)
    assert not mira.projections(model) and not hasattr(model.blocks[0], "mira_memory")
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"slices": ("q", "x")}, ValueError, "unknown slice 'x'"),
        ({"slices": (500,), "slice_width": 192}, ValueError, "outside the projection's 576 output features"),
        ({"key_dim": 64}, ValueError, "key_dim must equal the block width 192"),
        ({"blocks": (3,)}, IndexError, "out of range"),
        ({"query": "attention"}, ValueError, "unknown query"),
        ({"separation": "max"}, ValueError, "unknown separation"),
        ({"separation": "softmax", "capacity": 8}, ValueError, "fixed capacity"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, error, message):
    model = tiny_vit(depth=3)
    with pytest.raises(error, match=message):
        mira.attach(model, **kwargs)
    assert not mira.projections(model)


def test_bad_calls_on_an_attached_model():
    model = mira.attach(tiny_vit(depth=2))
    with pytest.raises(RuntimeError, match="already has MIRA layers"):
        mira.attach(model)
    with pytest.raises(ValueError, match="unknown stage"):
        mira.set_stage(model, "training")
    with pytest.raises(KeyError, match="no module named 'classifier'"):
        mira.set_stage(model, "adaptation", extra_trainable=("classifier",))
    with pytest.raises(ValueError, match="key width mismatch"):
        mira.write_adapters(model, keys=torch.randn(100))
    with pytest.raises(RuntimeError, match="no MIRA layers"):
        mira.set_stage(tiny_vit(depth=1), "adaptation")


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", ["adaptation", "consolidation"])
def test_only_the_stage_parameters_train(stage):
    model = mira.attach(tiny_vit(depth=2), query="linear", key_dim=16)
    # Two slots per block, so consolidation has keys to train: under the default per-feature key
    # normalisation a single key becomes its sign pattern, whose gradient is zero.
    for seed in (0, 2):
        fill_loras(model, seed=seed)
        mira.write_adapters(model)
    fill_loras(model, seed=1)
    mira.set_stage(model, stage, extra_trainable=("head",))
    expected = {f"blocks.{i}.{s}" for i in range(2) for s in (
        ("attn.qkv.lora_a", "attn.qkv.lora_b") if stage == "adaptation" else
        ("mira_memory.keys", "mira_memory.query_module.weight", "mira_memory.query_module.bias"))}
    expected |= {"head.weight", "head.bias"}
    assert _trainable_names(model) == expected
    assert {id(p) for p in mira.trainable_parameters(model, stage)} == {
        id(p) for n, p in model.named_parameters() if n in expected and not n.startswith("head")}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == expected


def test_inference_stage_trains_nothing_and_counts_parameters():
    model = mira.attach(tiny_vit(depth=2), capacity=30)
    mira.set_stage(model, "inference")
    assert not _trainable_names(model)
    counts = mira.count_parameters(model)
    # 30 keys of width 192 in each of the 2 blocks; the identity query adds nothing.
    assert counts["keys"] == 2 * 30 * 192 and counts["query"] == 0
    assert counts["bank"] == 2 * 30 * 2 * 2 * 4 * 192 and counts["lora"] == 2 * 2 * 2 * 4 * 192
    # What a served model adds: keys and the stored adapters (buffers), fp32.
    assert counts["added"] == counts["keys"] + counts["bank"] and counts["added_bytes"] == 4 * counts["added"]
    assert counts["backbone"] == sum(p.numel() for p in tiny_vit(depth=2).parameters())
    assert counts["total"] == counts["backbone"] + counts["added"] + counts["lora"]
    assert counts["trainable"] == 0


def test_write_adapters_stores_the_trained_lora_and_resets_it():
    model = mira.attach(tiny_vit(depth=2), separation="softmax")
    fill_loras(model)
    x = images()
    with torch.no_grad():
        adapted = model(x)
        loras = [(p.lora_a.clone(), p.lora_b.clone()) for p in mira.projections(model)]
        key = torch.randn(192)
        assert mira.write_adapters(model, keys=key) == [0, 0]
        for p, (a, b) in zip(mira.projections(model), loras):
            stored_a, stored_b = p.memory.stored_adapters
            assert torch.equal(stored_a[0], a) and torch.equal(stored_b[0], b)
            assert torch.equal(p.memory.stored_keys[0], key)
            assert not p.lora_b.any() and not torch.equal(p.lora_a, a)  # fresh adapter
        # One slot under softmax has weight exactly 1: the memory reproduces the adapted model.
        mira.set_stage(model, "inference")
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        mira.set_stage(model, "adaptation")
        assert mira.write_adapters(model, generator=torch.Generator().manual_seed(0)) == [1, 1]
        w = mira.memories(model)[0].get_association_matrix(tokens=torch.randn(3, 17, 192))
        torch.testing.assert_close(w.sum(1), torch.ones(3))  # softmax over the two slots
        # Per block, from the block's actual attention input (LN1's output).
        weights = mira.association_matrices(model, x)
        assert list(weights) == ["blocks.0.mira_memory", "blocks.1.mira_memory"]
        tokens = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x)))
        torch.testing.assert_close(weights["blocks.0.mira_memory"],
                                   mira.memories(model)[0].get_association_matrix(tokens=tokens))
        # Every block's from the inference forward, whatever the stage (the adaptation stage's live
        # LoRA of block 0 gave block 1 other inputs: its weights were off by 2.5), stages unchanged.
        seen = []
        hook = model.blocks[1].attn.qkv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        mira.set_stage(model, "inference")
        model(x)
        hook.remove()
        mira.set_stage(model, "adaptation")
        torch.testing.assert_close(weights["blocks.1.mira_memory"],
                                   mira.memories(model)[1].get_association_matrix(tokens=seen[0]))
        assert {p.stage for p in mira.projections(model)} == {"adaptation"}
        with pytest.raises(TypeError, match="inputs must be"):
            mira.association_matrices(model, [x])


def test_attached_model_matches_reference_backend():
    if "cpu" not in mira_kernels.available_backends("cpu"):
        pytest.skip("the C++ CPU backend is not built on this machine")
    model = mira.attach(tiny_vit(depth=3), query="mlp", key_dim=32)
    for _ in range(3):
        fill_loras(model, seed=_)
        mira.write_adapters(model)
    mira.set_stage(model, "consolidation")
    x = images()
    outs = []
    for backend in ("reference", "cpu"):
        model.zero_grad()
        with mira_kernels.use_backend(backend):
            y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), [m.keys.grad.clone() for m in mira.memories(model)]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for got, ref in zip(outs[1][1], outs[0][1]):
        # Under the default per-feature key normalisation every key's gradient is a sum over all
        # keys with cancellation: float32 rounding is relative to the gradient's scale (measured
        # 7e-5 of max |grad|), not to each element.
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_torch_compile_has_no_graph_break_in_mira_layers():
    model = mira.attach(tiny_vit(depth=3), capacity=4)
    fill_loras(model)
    mira.write_adapters(model)
    mira.set_stage(model, "consolidation")
    x = images(2)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    # A whole block with fullgraph=True, forward and backward (fake kernels + autograd of the op).
    block = model.blocks[0]
    tokens = torch.randn(2, 17, 192, requires_grad=True)
    expected = block(tokens)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), block.mira_memory.keys)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(tokens)
    (grad_got,) = torch.autograd.grad(got.square().sum(), block.mira_memory.keys)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)
    # Fixed capacity: an append changes values only, so the compiled block does not recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        mira.memories(model)[0].append(*[t[:1] * 0.5 for t in mira.memories(model)[0].stored_adapters])
        torch.testing.assert_close(compiled(tokens), block(tokens), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_in_eval_ignores_the_eager_calls_eval_plans():
    # Eager eval calls on CPU make eval plans (mira.layers); Dynamo must not see them: no graph break,
    # and no recompile when eager calls remake them (the forward reads a plan only outside tracing).
    model = mira.attach(tiny_vit(depth=2), capacity=4)
    fill_loras(model)
    mira.write_adapters(model)
    mira.set_stage(model, "inference")
    model.eval()
    x = images(2)
    with torch.no_grad():
        model(x)
        model(x)
        assert all(p._eval_plan is not None and not p._eval_plan.stale for p in mira.projections(model))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            mira.memories(model)[0].append(*[t[:1] * 0.5 for t in mira.memories(model)[0].stored_adapters])
            want = model(x)  # eager: remakes block 0's plan
            torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_detach_restores_the_backbone():
    model = mira.attach(tiny_vit(depth=2))
    fill_loras(model)
    mira.detach(model)
    assert not mira.projections(model) and not mira.memories(model)
    assert sorted(model.state_dict()) == sorted(tiny_vit(depth=2).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images()), tiny_vit(depth=2)(images()), rtol=0, atol=0)


@pytest.mark.gpu
def test_fixed_capacity_append_is_seen_by_a_captured_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = mira.attach(tiny_vit(depth=2).cuda(), capacity=4)
    fill_loras(model)
    mira.write_adapters(model)
    mira.set_stage(model, "inference")
    x = images(2).cuda()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (allocations, Triton compilation)
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(x)
        graph.replay()
        before = static_out.clone()
        torch.testing.assert_close(before, model(x), rtol=1e-4, atol=1e-4)
        fill_loras(model, seed=3, std=0.5)
        mira.write_adapters(model)  # in place: the captured graph reads the same storage
        graph.replay()
        torch.testing.assert_close(static_out, model(x), rtol=1e-4, atol=1e-4)
        assert (static_out - before).abs().max() > 1e-3


def test_a_failed_dry_run_names_the_input_it_ran_on_and_how_to_give_another():
    # The input size is read from patch_embed.img_size or pretrained_cfg: a model built for other
    # inputs (or a wrong example_input) fails its dry run, and the error must say on what input.
    model = tiny_vit(depth=1)
    with pytest.raises(RuntimeError, match=r"(?s)on an input of shape \(2, 3, 64, 64\) failed.*pass example_input="):
        mira.attach(model, example_input=torch.randn(2, 3, 64, 64))
    assert not mira.projections(model)


def test_the_mean_query_leaves_out_every_token_of_a_model_without_num_prefix_tokens():
    # PiT keeps its CLS and distillation tokens in one cls_token (1, 2, d) and has no num_prefix_tokens.
    model = timm.create_model("pit_ti_distilled_224", pretrained=False, num_classes=5).eval()
    assert not hasattr(model, "num_prefix_tokens") and model.cls_token.shape[1] == 2
    mira.attach(model, query_token="mean")
    assert {m.config.num_prefix_tokens for m in mira.memories(model)} == {2}


@pytest.mark.parametrize("query_token", ["cls", "mean"])
def test_attach_to_a_features_only_vit_reads_the_wrapped_vits_tokens_and_input_size(query_token):
    # timm's features_only wrapper (FeatureGetterNet) holds the ViT at .model. Read from the wrapper,
    # the CLS token went unseen: "cls" was refused as having none, and "mean" averaged the CLS token
    # into every query; without example_input the dry run's input size was not found.
    def vit(**kwargs):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 **kwargs).eval()

    features = mira.attach(vit(features_only=True, out_indices=(0, 1)), query_token=query_token)
    plain = mira.attach(vit(), query_token=query_token)
    assert [m.config.num_prefix_tokens for m in mira.memories(features)] == [1, 1]
    for model in (features, plain):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g))
        mira.write_adapters(model, generator=g)
        mira.write_adapters(model, generator=g)
        mira.set_stage(model, "inference")
    x = images()
    with torch.no_grad():
        expected = plain.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        for got, want in zip(features(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("stage", ["adaptation", "inference"])
def test_a_dynamically_quantized_base_layer_gets_the_adapter_added(stage):
    # torch.ao quantize_dynamic swaps the wrapped Linear for a quantized one, whose weight is a method:
    # every forward failed inside the layer ("'function' object has no attribute 'new_zeros'").
    from tests.tiny_models import filled_vit

    model = mira.set_stage(filled_vit(), stage)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    tokens = torch.randn(2, 17, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for plain, packed in zip(mira.projections(model), mira.projections(quantized), strict=True):
            assert callable(packed.base_layer.weight)
            adapter = plain(tokens) - plain.base_layer(tokens)
            torch.testing.assert_close(packed(tokens) - packed.base_layer(tokens), adapter, rtol=1e-5, atol=1e-5)
            assert adapter.abs().max() > 0.1
    with pytest.raises(RuntimeError, match="packed by quantization.*merge / fold before quantizing"):
        mira.merge(mira.set_stage(quantized, "adaptation"))


def test_fx_feature_extraction_keeps_the_projection_as_one_call():
    # fx traced into MiraProjection.forward and failed at its first branch ("symbolically traced
    # variables cannot be used as inputs to control flow"), naming no cure.
    from timm.models._features_fx import create_feature_extractor as timm_extractor
    from torchvision.models.feature_extraction import create_feature_extractor

    from tests.tiny_models import filled_vit

    model = mira.set_stage(filled_vit(), "inference")
    x = images()
    with torch.no_grad():
        expected = model(x)
        for extractor in (timm_extractor(model, return_nodes={"head": "out"}),
                          create_feature_extractor(model, return_nodes={"head": "out"},
                                                   tracer_kwargs={"leaf_modules": [mira.MiraProjection]})):
            torch.testing.assert_close(extractor(x)["out"], expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"make it a leaf module.*leaf_modules"):
        create_feature_extractor(model, return_nodes={"head": "out"})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_is_refused_naming_what_exports_an_attached_model():
    from tests.tiny_models import filled_vit

    for target in (filled_vit(), mira.projections(filled_vit())[0]):
        with pytest.raises(RuntimeError, match=r"cannot be compiled by TorchScript.*mira.export.export_program"):
            torch.jit.script(target)
