"""The layer API under the use a review found mishandled (2026-12-07): partial and 16-bit
state-dict loads, a failed load_model, batch 0, hooked or pruned base layers, huge keys,
non-finite adapters, boolean slot masks, block lists, strings for sequences, detach's undo.

Each test failed before its fix (the review's reproduction, on the tiny ViT).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

import mira
from tests.tiny_models import WIDTH, filled_vit, images, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")


def filled(seed=3, n=2, **attach_args):
    """An attached tiny ViT whose memories hold ``n`` adapters (non-zero LoRA B)."""
    return filled_vit(seed, n, **attach_args)


def memory_state(model):
    return {f"{name}.{k}": v.clone() for name, m in mira.named_memories(model) for k, v in m.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# load_state_dict
# ----------------------------------------------------------------------------------------------


def test_a_non_strict_load_without_the_memories_loads_the_rest():
    # torch passes strict=True to every module's loader whatever the caller asked; the memory used
    # to refuse every state lacking its entries, so strict=False checkpoints of the head failed.
    model, source = filled(), filled(seed=5)
    before = memory_state(model)
    head = {k: v for k, v in source.state_dict().items() if k.startswith("head.")}
    result = model.load_state_dict(head, strict=False)
    assert torch.equal(model.head.weight, source.head.weight)
    assert same(before, memory_state(model)) and any("mira_memory" in k for k in result.missing_keys)
    model.load_state_dict({}, strict=False)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: torch's own report
        model.load_state_dict(head)


def test_a_non_strict_load_of_the_trainable_parameters_loads_the_keys():
    model, source = filled(), filled(seed=5)
    mira.set_stage(source, "consolidation", extra_trainable=("head",))
    trainable = {k: v for k, v in source.state_dict(keep_vars=True).items() if v.requires_grad}
    assert any(k.endswith("mira_memory.keys") for k in trainable) and not any("bank" in k for k in trainable)
    model.load_state_dict({k: v.detach() for k, v in trainable.items()}, strict=False)
    for a, b in zip(mira.memories(model), mira.memories(source), strict=True):
        assert torch.equal(a.keys, b.keys)


def test_a_strict_load_missing_part_of_a_memory_changes_nothing():
    # The fuzzer's case (make fuzz, 2026-12-07): a growing memory's state (no active mask) into a
    # fixed-capacity memory of the same slot count. torch loads what fits and then raises for the
    # missing key; the memory must not be left half-loaded by that failed call.
    model, source = filled(capacity=2), filled(seed=5)
    before = memory_state(model)
    with pytest.raises(RuntimeError, match=r"missing \[.*active"):
        model.load_state_dict(source.state_dict())
    assert same(before, memory_state(model))
    result = model.load_state_dict(source.state_dict(), strict=False)  # loads what it holds
    assert any(k.endswith("active") for k in result.missing_keys)
    for a, b in zip(mira.memories(model), mira.memories(source), strict=True):
        assert torch.equal(a.keys, b.keys)


def test_a_resize_needs_every_entry_and_a_foreign_config_is_refused():
    model, bigger = filled(), filled(seed=5, n=3)
    before = memory_state(model)
    keys_only = {k: v for k, v in bigger.state_dict().items() if k.endswith("mira_memory.keys")}
    with pytest.raises(RuntimeError, match="resizing to 3 slots needs every entry"):
        model.load_state_dict(keys_only, strict=False)
    assert same(before, memory_state(model))
    other = filled(seed=5, query="mlp", query_hidden=8)
    with pytest.raises(RuntimeError, match="another memory config"):
        model.load_state_dict(other.state_dict(), strict=False)
    assert same(before, memory_state(model))


def test_a_state_dict_too_large_for_float16_banks_is_refused_not_loaded_as_inf():
    source = filled()
    with torch.no_grad():
        mira.memories(source)[0].bank_b[0, 0, 0, 0] = 1e6
    model = filled(bank_dtype=torch.float16)
    before = memory_state(model)
    with pytest.raises(RuntimeError, match="beyond torch.float16's range"):
        model.load_state_dict(source.state_dict())
    assert same(before, memory_state(model))
    assert all(bool(torch.isfinite(m.bank_b).all()) for m in mira.memories(model))


# ----------------------------------------------------------------------------------------------
# load_model, detach
# ----------------------------------------------------------------------------------------------


def test_load_model_with_a_bad_stage_leaves_the_backbone_as_it_was(tmp_path):
    path = tmp_path / "m.safetensors"
    mira.save_model(filled(), path)
    backbone = tiny_vit()
    flags = [p.requires_grad for p in backbone.parameters()]
    with pytest.raises(ValueError, match="unknown stage 'Inference'"):
        mira.load_model(backbone, path, stage="Inference")
    assert not mira.projections(backbone) and [p.requires_grad for p in backbone.parameters()] == flags


def test_detach_gives_back_the_requires_grad_attach_took():
    model = tiny_vit()
    model.blocks[0].requires_grad_(False)  # the user's own choice, kept
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mira.attach(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in flags)
    mira.detach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["adaptation", "consolidation", "inference"])
def test_a_batch_of_zero_runs_in_every_stage(stage):
    model = filled()
    mira.set_stage(model, stage)
    with torch.no_grad():
        assert model(images(batch=0)).shape == (0, 5)


def test_a_pruned_base_layer_runs_with_its_pruned_weight_in_every_stage():
    model = filled()
    x = images()
    base = model.blocks[0].attn.qkv.base_layer
    prune.l1_unstructured(base, "weight", 0.3)
    for stage in ("adaptation", "consolidation", "inference"):
        mira.set_stage(model, stage)
        with torch.no_grad():
            got = model(x)
            with torch.no_grad():  # the same model with the pruned weight written in, no hook
                plain = filled()
                plain.load_state_dict(model.state_dict(), strict=False)
                pb = plain.blocks[0].attn.qkv.base_layer
                pb.weight.copy_(base.weight)
                mira.set_stage(plain, stage)
            torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_the_base_layer_runs():
    model = filled()
    mira.set_stage(model, "inference")
    x = images()
    with torch.no_grad():
        model(x)
        model(x)  # an eval plan is made on the CPU
        clean = model(x)
        calls = []
        handle = model.blocks[1].attn.qkv.base_layer.register_forward_hook(
            lambda mod, args, out: calls.append(1) or out * 2)
        hooked = model(x)
        handle.remove()
        again = model(x)
    assert calls == [1] and not torch.allclose(hooked, clean)
    torch.testing.assert_close(again, clean, rtol=0, atol=0)


def test_huge_keys_keep_their_weights_under_the_per_feature_norm():
    model = filled()
    mira.set_stage(model, "inference")
    x = images()
    with torch.no_grad():
        want = mira.association_matrices(model, x)
        for m in mira.memories(model):
            m.keys.mul_(1e20)
            m.invalidate_cache()
        got = mira.association_matrices(model, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_a_query_from_no_token_is_refused_not_nan():
    from mira.query import pool_tokens

    with pytest.raises(ValueError, match="hold none"):
        pool_tokens(torch.randn(2, 1, 8), "mean", 1)
    with pytest.raises(ValueError, match="hold none"):
        pool_tokens(torch.randn(2, 0, 8), "cls", 1)


@pytest.mark.parametrize("query", ["identity", "linear"])
def test_an_input_without_tokens_gets_the_query_error_from_every_query_module(query):
    # The CLS token was taken as x[:, 0] by the layer itself with the identity query: a bare IndexError.
    model = mira.set_stage(filled(query=query), "inference").eval()
    qkv = mira.projections(model)[0]
    with torch.no_grad():
        qkv(torch.randn(2, 5, WIDTH))
        want = qkv(torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(0)))  # the eval plan's call
        with pytest.raises(ValueError, match="query_token='cls' takes token 0, but the tokens .* hold none"):
            qkv(torch.randn(2, 0, WIDTH))
        assert torch.equal(qkv(torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(0))), want)


class _Same(torch.nn.Module):
    def forward(self, t):
        return t


@pytest.mark.parametrize("name", ["bank_b", "active"])
def test_a_parametrized_memory_tensor_is_refused_by_name_at_the_forward(name):
    # The forward read the tensor from the memory's dicts, which parametrize empties: an internal KeyError.
    model = mira.set_stage(filled(capacity=4), "inference").eval()
    x = images()
    with torch.no_grad():
        model(x)
        want = model(x)  # from the cache and the eval plans
    memory = mira.memories(model)[0]
    parametrize.register_parametrization(memory, name, _Same())
    refused = f"AdapterMemory.{name} is parametrized.*remove_parametrizations"
    with torch.no_grad(), pytest.raises(TypeError, match=refused):
        model(x)
    parametrize.remove_parametrizations(memory, name)  # the cure the message names
    with torch.no_grad():
        assert torch.equal(model(x), want)


# ----------------------------------------------------------------------------------------------
# Stored adapters, slots, arguments
# ----------------------------------------------------------------------------------------------


def test_non_finite_adapters_are_refused_on_write_and_on_save(tmp_path):
    model = filled()
    before = memory_state(model)
    with torch.no_grad():
        mira.projections(model)[0].lora_b[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        mira.write_adapters(model)
    assert same(before, memory_state(model))
    with torch.no_grad():
        mira.memories(model)[0].keys[0, 0] = float("inf")
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="NaN or inf.*nothing was written"):
        mira.save_memories(model, path)
    assert not path.exists()


def test_remove_takes_a_boolean_mask_and_refuses_flags():
    memory = mira.memories(filled(n=3))[0]
    keys = memory.stored_keys.clone()
    memory.remove(torch.tensor([True, False, True]))
    assert memory.num_slots == 1 and torch.equal(memory.stored_keys, keys[1:2])
    with pytest.raises(ValueError, match="one entry per stored adapter"):
        memory.remove(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="flag"):
        memory.remove([True])
    assert memory.num_slots == 1


def test_block_lists_that_name_a_block_twice_or_use_flags_are_refused():
    with pytest.raises(ValueError, match="same block twice"):
        mira.attach(tiny_vit(depth=2), blocks=(0, -2))
    with pytest.raises(TypeError, match="block indices"):
        mira.MiraConfig(blocks=True)
    model = tiny_vit()
    with pytest.raises(ValueError, match="selects no block"):
        mira.attach(model, blocks=())
    assert not mira.projections(model)


def test_association_matrix_names_the_tokens_argument():
    memory = mira.memories(filled())[0]
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T, 192\)"):
        memory.get_association_matrix(tokens=torch.randn(2, 192))


def test_a_string_where_names_are_expected_is_refused(tmp_path):
    model = filled()
    with pytest.raises(TypeError, match=r"\('head',\)"):
        mira.set_stage(model, "adaptation", extra_trainable="head")
    with pytest.raises(TypeError, match=r"\('head',\)"):
        mira.save_model(model, tmp_path / "m.safetensors", modules="head")


def test_mean_retrieval_weights_takes_one_tensor_as_one_batch():
    model = filled()
    x = images()
    assert mira.mean_retrieval_weights(model, x, progress=False).keys() == \
        mira.mean_retrieval_weights(model, [x], progress=False).keys()


# ----------------------------------------------------------------------------------------------
# Serving and model surgery (a second review, 2026-12-07)
# ----------------------------------------------------------------------------------------------


def test_loading_base_weights_into_a_merged_model_is_refused_and_keeps_the_merged_weight():
    # Refused before anything loads (mira.merge registers the refusal as a load-state-dict pre-hook).
    import copy

    model = filled()
    x = images()
    saved = copy.deepcopy(model.state_dict())
    mira.merge(model)
    with torch.no_grad():
        merged = model(x)
    with pytest.raises(RuntimeError, match=r"merged update.*mira.unmerge"):
        model.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged, rtol=0, atol=0)
    mira.unmerge(model)
    model.load_state_dict(saved)  # after unmerge: the saved bits back


def test_the_float64_judge_takes_16_bit_banks():
    from mira.export import check_against_float64

    model = filled(bank_dtype=torch.bfloat16)
    mira.set_stage(model, "inference")
    x = images()
    with torch.no_grad():
        check = check_against_float64(model, x, {"eager": model(x)})
    assert check.errors["eager"] <= check.bound
    assert all(m.bank_a.dtype == torch.bfloat16 for m in mira.memories(model))  # the model is not changed


def test_mean_retrieval_weights_gives_each_module_its_own_mode_back():
    model = filled()
    model.train()
    model.blocks.eval()
    mira.mean_retrieval_weights(model, [images(batch=2)], progress=False)
    assert model.training and model.head.training and not model.blocks[0].training


def test_task_functions_refuse_none_and_an_empty_selection():
    model = filled()
    with pytest.raises(TypeError, match="remove_tasks: tasks are given by name"):
        mira.remove_tasks(model, None)
    with pytest.raises(ValueError, match="would remove every slot"):
        mira.select_tasks(model, [])
    with pytest.raises(TypeError, match="by name"):
        mira.task_slot_weights(model, None)
    assert all(m.num_slots == 2 for m in mira.memories(model))


def test_import_peft_into_the_lora_leaves_no_untrainable_rows(tmp_path):
    from tests.tiny_models import peft_vit

    peft_model = peft_vit(tmp_path, r=2, lora_alpha=4)  # rank 2 into the default rank 4: 2 padded rows
    model = mira.attach(tiny_vit())
    mira.import_peft(model, tmp_path, generator=torch.Generator().manual_seed(0))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-5)  # outputs as PEFT's
    model(x).square().sum().backward()
    for p in mira.projections(model):
        assert bool((p.lora_a[:, 2:].abs().sum(-1) > 0).all())  # padded A rows drawn, not zero
        assert bool(p.lora_b.grad[..., 2:].abs().sum() > 0)  # and their B columns get gradients


def test_import_peft_keeps_float64_factors_exact(tmp_path):
    from tests.tiny_models import peft_vit

    peft_model = peft_vit(tmp_path, r=4, lora_alpha=8).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # A factors float32 cannot hold (B's k rows must stay zero)
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-9)
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    model = mira.attach(tiny_vit().double())
    mira.import_peft(model, (state, {"r": 4, "lora_alpha": 8}))
    x = images().double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Configuration (a third review, 2026-12-07)
# ----------------------------------------------------------------------------------------------


def test_config_takes_numpy_scalars_and_refuses_what_bool_or_set_would_silently_misread():
    import numpy as np

    import mira_kernels as mk

    assert mira.MiraConfig(scale=np.float32(2)).scale == 2.0
    with pytest.raises(ValueError, match="scale must be a finite number"):
        mira.MiraConfig(scale=10**400)
    with pytest.raises(TypeError, match="trainable_bank must be True or False"):
        mira.MiraConfig(trainable_bank="false")
    with pytest.raises(TypeError, match="slices must be ordered"):
        mira.MiraConfig(slices={"q", "v"})
    assert mira.MiraConfig(blocks=(i for i in range(2))).blocks == (0, 1)
    with pytest.raises(TypeError, match="a dict of its fields"):
        mira.MemoryConfig.from_dict("notadict")
    with pytest.raises(TypeError, match="True or False"), mk.check_finite("false"):
        pass


def test_the_experiments_cache_expands_a_tilde(monkeypatch, tmp_path):
    from mira.experiments.backbone import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", "~/mk")
    assert cache_dir() == str(tmp_path / "mk")


@pytest.mark.parametrize("query", ["identity", "linear"])
def test_query_hidden_without_an_mlp_query_is_refused(query):
    # The width only shapes MlpQuery; elsewhere it was accepted and silently did nothing.
    with pytest.raises(ValueError, match="query_hidden=8 sets the hidden width of the 'mlp' query module"):
        mira.attach(tiny_vit(), query=query, query_hidden=8)
    mira.attach(tiny_vit(), query="mlp", query_hidden=8)


def test_attach_keeps_each_module_mode_and_its_dry_run_input_off_the_global_random_stream():
    # attach's dry runs put every module in eval and then set one flag everywhere (a frozen
    # BatchNorm or dropout in eval inside a training model came back in train); the dry run's input
    # came from the global generator (the memories' initialisation draws from it, as any module's).
    from mira.integration import _example_input

    model = tiny_vit().train()
    model.blocks[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    mira.attach(model)
    assert {name: m.training for name, m in model.named_modules() if name in modes} == modes
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    first = _example_input(model, 2)
    assert torch.equal(torch.rand(3), want) and torch.equal(_example_input(model, 2), first)


# ----------------------------------------------------------------------------------------------
# The task, optimiser-state, summary and query functions under careless input (review of 2026-12-07)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [5, 1.5, torch.tensor(0)])
def test_task_functions_name_the_argument_for_a_non_iterable(tasks):
    model = filled()
    for fn in (mira.remove_tasks, mira.select_tasks):
        with pytest.raises(TypeError, match=f"{fn.__name__}: tasks are given by name"):
            fn(model, tasks)
    assert all(m.num_slots == 2 for m in mira.memories(model))


@pytest.mark.parametrize("capacity", [None, 4])
def test_removing_no_task_keeps_the_gradients(capacity):
    model = filled(capacity=capacity)
    mira.set_stage(model, "consolidation")
    model(images(batch=2)).sum().backward()
    grads = [m.keys.grad.clone() for m in mira.memories(model)]
    assert mira.remove_tasks(model, []) == [0, 0]
    assert all(m.keys.grad is not None and torch.equal(m.keys.grad, g) for m, g in zip(mira.memories(model), grads))


def test_removing_a_slot_of_a_fixed_capacity_memory_leaves_no_gradient_on_the_wrong_slot():
    model = mira.attach(tiny_vit(), capacity=4)
    g = torch.Generator().manual_seed(0)
    for task in ("a", "b"):
        with torch.no_grad():
            for p in mira.projections(model):
                p.lora_b.normal_(generator=g)
        mira.write_adapters(model, task=task, generator=g)
    mira.set_stage(model, "consolidation")
    model(images(batch=2)).sum().backward()
    assert all(m.keys.grad[0].any() for m in mira.memories(model))
    mira.remove_tasks(model, "a")
    for m in mira.memories(model):
        # slot 0 now holds task b: the gradient of a's key must not step it (a growing memory drops it too)
        assert m.keys.grad is None or not m.keys.grad.any()


def test_forget_optimizer_state_refuses_swapped_or_wrong_arguments_and_a_model_without_mira():
    model = filled()
    optimizer = torch.optim.SGD(mira.trainable_parameters(model, "consolidation"), lr=0.1)
    with pytest.raises(TypeError, match="forget_optimizer_state: model must be an nn.Module"):
        mira.forget_optimizer_state(optimizer, model)
    for wrong in (None, list(model.parameters())):
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
            mira.forget_optimizer_state(model, wrong)
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
            mira.memories(model)[0].forget_optimizer_state(wrong)
    with pytest.raises(RuntimeError, match="no MIRA memories"):  # e.g. the backbone passed for the model
        mira.forget_optimizer_state(tiny_vit(), optimizer)


def test_query_modules_refuse_sizes_and_kinds_they_cannot_build():
    from mira.query import pool_tokens

    with pytest.raises(TypeError, match="kind"):
        mira.build_query_module(["mlp"], 4, 4)  # was "unhashable type: 'list'"
    # a flag, a str, a negative width or a hidden width of 0 built a module (0 meant the default)
    for args in (("linear", True, 4), ("identity", "4", "4"), ("identity", -1, -1), ("mlp", 4, 4, 0)):
        with pytest.raises((TypeError, ValueError), match="features"):
            mira.build_query_module(*args)
    with pytest.raises(ValueError, match="hidden_features=8"):  # a width that would do nothing
        mira.build_query_module("linear", 4, 4, 8)
    with pytest.raises(ValueError, match="hidden_features must be >= 1"):
        mira.MlpQuery(4, 4, 0)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="query_token"):  # was the mean of the patch tokens
        pool_tokens(x, "CLS", 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):  # was the mean of the last token alone
        pool_tokens(x, "mean", -1)
    assert mira.build_query_module("mlp", 4, 3, 8).fc1.out_features == 8


@pytest.mark.parametrize("fn", [mira.parameter_summary, mira.print_trainable_parameters, mira.count_parameters,
                                mira.memories, mira.projections, mira.task_slots, mira.unfold])
def test_functions_taking_the_model_name_one_that_is_not_a_module(fn):
    with pytest.raises(TypeError, match=r"model must be an nn.Module .*got str"):
        fn("vit_tiny_patch16_224")  # was "'str' object has no attribute 'named_modules'"


def test_loading_into_a_fixed_capacity_memory_leaves_no_gradient_of_the_old_contents(tmp_path):
    # The load overwrote the slots in place and kept their gradients: a step right after it moved the
    # loaded keys by the gradients of the keys that sat there before.
    source = filled(seed=4, capacity=4)
    mira.save_memories(source, tmp_path / "m.safetensors")
    model = filled(seed=3, capacity=4)
    mira.set_stage(model, "consolidation")
    model(images(batch=2)).sum().backward()
    assert all(m.keys.grad is not None and m.keys.grad.any() for m in mira.memories(model))
    mira.load_memories(model, tmp_path / "m.safetensors")
    assert all(m.keys.grad is None for m in mira.memories(model))


def test_extra_trainable_inside_a_projection_is_refused_and_changes_nothing():
    # The wrapped base layer was accepted and unfrozen: the next training forward raised in the fused op.
    model = filled()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.base_layer' is part of the MIRA layer "
                                         r"'blocks\.0\.attn\.qkv'.*name a module outside"):
        mira.set_stage(model, "consolidation", extra_trainable=("head", "blocks.0.attn.qkv.base_layer"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {p.stage for p in mira.projections(model)} == {"adaptation"}
    # Inside a memory: its query module trains as the stage says (it was unfrozen in adaptation too).
    with pytest.raises(ValueError, match=r"'blocks\.0\.mira_memory\.query_module' is part of the MIRA layer "
                                         r"'blocks\.0\.mira_memory'"):
        mira.set_stage(model, "adaptation", extra_trainable=("blocks.0.mira_memory.query_module",))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    mira.set_stage(model, "adaptation", extra_trainable=("blocks.0.attn.proj",))  # beside the projection: fine
    model.train()
    model(images()).sum().backward()


@pytest.mark.parametrize("example_input", [[images(2)], {"x": images(2)}, images(2).numpy()],
                         ids=["list", "dict", "ndarray"])
def test_attach_names_example_input_when_it_is_not_a_tensor(example_input):
    # A list or dict raised "'list' object has no attribute 'shape'" from inside the dry run.
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"attach: example_input must be a torch\.Tensor.*got "
                                        + type(example_input).__name__):
        mira.attach(model, example_input=example_input)
    assert not mira.projections(model) and same(model.state_dict(), before)
