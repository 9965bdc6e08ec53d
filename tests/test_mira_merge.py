"""Merge / unmerge of the live LoRA and fold / unfold of a fixed memory mixture, against the unmerged model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mira
from tests import tiny_models

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")


DEPTH = 2  # fold takes one weight vector per block; the overflow check needs a block before the one that overflows


def tiny_vit():
    return tiny_models.tiny_vit(depth=DEPTH)


def images(batch=3, seed=1, dtype=torch.float32):
    return tiny_models.images(batch, seed).to(dtype)


def fill_loras(model, g, std=0.2):
    with torch.no_grad():
        for p in mira.projections(model):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * std)


def trained(dtype=torch.float32, slots=3, **attach_args):
    """An attached model with `slots` stored adapters and a trained-looking live LoRA."""
    model = mira.attach(tiny_vit(), **attach_args)
    g = torch.Generator().manual_seed(0)
    for _ in range(slots):
        fill_loras(model, g)
        mira.write_adapters(model, generator=g)
    fill_loras(model, g)
    return model.to(dtype)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def qkv_weights(model):
    return [p.base_layer.weight.detach().clone() for p in mira.projections(model)]


def assert_restored_to_rounding(model, before, merged):
    """unmerge / unfold round twice (W + D, then - D): within eps * max(|W|, |W + D|) of the original."""
    for p, w, w_merged in zip(mira.projections(model), before, merged):
        now = p.base_layer.weight.detach()
        bound = torch.finfo(w.dtype).eps * torch.maximum(w.abs(), w_merged.abs())
        assert bool(((now - w).abs() <= bound).all()), err(now, w)
        assert not torch.equal(w_merged, w)  # there was an update to take out


@torch.no_grad()
def test_merge_matches_the_unmerged_model_float64_to_rounding_and_unmerge_restores():
    model = trained(torch.float64)
    x = images(dtype=torch.float64)
    expected = model(x)  # adaptation stage: the live LoRA runs through the op
    before = qkv_weights(model)
    assert mira.merge(model) is model
    assert all(p.merged_update.kind == "merged" for p in mira.projections(model))
    assert "merged" in repr(model.blocks[0].attn.qkv)
    assert err(model(x), expected) < 1e-12
    merged = qkv_weights(model)
    mira.unmerge(model)
    assert_restored_to_rounding(model, before, merged)
    assert err(model(x), expected) < 1e-12
    assert all(p.merged_update is None for p in mira.projections(model))


@torch.no_grad()
def test_merge_and_fold_in_float32_within_twice_pytorchs_own_error():
    """The stated fp32 bound: error against the float64 unmerged model <= 2x the unmerged fp32 model's own."""
    model64 = trained(torch.float64)
    model32 = trained(torch.float32)
    x = images()
    expected64 = model64(x.double())
    own = err(model32(x), expected64)
    mira.merge(model32)
    assert err(model32(x), expected64) <= 2 * own + 1e-6
    mira.unmerge(model32)
    for model in (model64, model32):
        mira.set_stage(model, "inference")
    one = x[:1]
    expected64 = model64(one.double())
    own = err(model32(one), expected64)
    mira.fold(model32, mira.mean_retrieval_weights(model32, [one]))
    assert err(model32(one), expected64) <= 2 * own + 1e-6
    # The memories do not run in a folded model: its weights would be block 0's alone right (they were given).
    with pytest.raises(RuntimeError, match="association_matrices: the model holds a merged or folded update"):
        mira.association_matrices(model32, one)


@torch.no_grad()
def test_fold_calibrated_on_one_image_reproduces_the_per_sample_model_float64():
    """With a one-image calibration set the mean weights are that image's weights at every block, so
    the folded model (a plain linear per block) must give that image's MIRA output to rounding."""
    model = mira.set_stage(trained(torch.float64, query="linear", key_dim=32), "consolidation")
    x = images(dtype=torch.float64)
    expected = model(x)
    for i in range(x.shape[0]):
        before = qkv_weights(model)  # each round trip rounds anew
        weights = mira.mean_retrieval_weights(model, [x[i:i + 1]], progress=False)
        assert set(weights) == {n for n, _ in mira.named_memories(model)}
        mira.fold(model, weights)
        assert err(model(x[i:i + 1]), expected[i:i + 1]) < 1e-12
        folded = qkv_weights(model)
        mira.unfold(model)
        assert_restored_to_rounding(model, before, folded)
    assert {p.stage for p in mira.projections(model)} == {"consolidation"}  # kept through fold / unfold
    assert err(model(x), expected) < 1e-12


@torch.no_grad()
def test_fold_with_given_weights_equals_the_live_lora_of_the_mixed_factors():
    model = trained(torch.float64, slots=4)
    w = torch.tensor([0.5, -0.25, 1.0, 0.0], dtype=torch.float64)
    reference = trained(torch.float64, slots=4)  # same stored adapters; its live LoRA := the mixture
    for p in mira.projections(reference):
        bank_a, bank_b = p.memory.stored_adapters
        p.lora_a.copy_(torch.einsum("n,nsrd->srd", w, bank_a))
        p.lora_b.copy_(torch.einsum("n,nser->ser", w, bank_b))
    x = images(dtype=torch.float64)
    mira.set_stage(model, "inference")
    mira.fold(model, w)  # one weight vector for every block; also a list per block or a dict by name
    assert err(model(x), reference(x)) < 1e-12
    mira.unfold(model)
    mira.fold(model, [w.tolist()] * DEPTH)
    assert err(model(x), reference(x)) < 1e-12
    mira.unfold(model)
    mira.fold(model, w.numpy())  # a calibration computed in numpy (it was refused as "got ndarray")
    assert err(model(x), reference(x)) < 1e-12
    mira.unfold(model)
    mira.fold(model, [w.numpy()] * DEPTH)  # one numpy array per memory (it was refused as "got list")
    assert err(model(x), reference(x)) < 1e-12
    mira.unfold(model)
    with pytest.raises(TypeError, match="fold: weights must be"):  # flags are no weighting (they were taken as 1, 0)
        mira.fold(model, [True, False, True, False])


def test_mean_retrieval_weights_is_the_mean_over_samples_of_the_association_matrices():
    model = mira.set_stage(trained(), "adaptation")
    batches = [images(2, seed=1), (images(3, seed=2), torch.zeros(3))]  # tensors or (inputs, targets)
    model.train()
    means = mira.mean_retrieval_weights(model, batches, progress=False)
    assert model.training and {p.stage for p in mira.projections(model)} == {"adaptation"}  # restored
    mira.set_stage(model, "inference")
    model.eval()
    everything = torch.cat([images(2, seed=1), images(3, seed=2)])
    for name, w in mira.association_matrices(model, everything).items():
        torch.testing.assert_close(means[name], w.double().mean(0), rtol=1e-6, atol=1e-7)
        assert means[name].shape == (3,)
    with pytest.raises(ValueError, match="empty"):
        mira.mean_retrieval_weights(model, [], progress=False)
    with pytest.raises(TypeError, match="input tensors or"):
        mira.mean_retrieval_weights(model, [{"x": images(1)}], progress=False)


@torch.no_grad()
def test_a_folded_model_runs_and_exports_as_the_plain_backbone():
    model = mira.set_stage(trained(), "inference")
    x = images()
    mira.fold(model, torch.full((3,), 1 / 3))
    folded = model(x)
    backbone_ops = _ops(torch.export.export(tiny_vit(), (x,)))
    assert _ops(torch.export.export(model, (x,))) == backbone_ops  # no MIRA op, no memory read
    mira.unload(model)  # PEFT's merge_and_unload: the update stays in the weights
    assert not mira.projections(model) and not mira.memories(model)
    assert all(type(b.attn.qkv) is nn.Linear for b in model.blocks)
    assert sorted(model.state_dict()) == sorted(tiny_vit().state_dict())
    torch.testing.assert_close(model(x), folded, rtol=0, atol=0)


@torch.no_grad()
def test_unload_of_a_projection_or_attention_module_is_refused_and_changes_nothing():
    # unload cleared the fold's record on every projection below what it was given, but detach only replaces
    # a block's attn.qkv: given the attention module or the projection, the projection stayed and ran its
    # memory on top of the folded weight (a silent wrong answer), and unfold could no longer take it out.
    model = mira.set_stage(trained(), "inference")
    x = images()
    live = model(x)
    mira.fold(model, torch.full((3,), 1 / 3))
    folded = model(x)
    hooks = [dict(m._load_state_dict_pre_hooks) for m in model.modules()]
    for part, kept in ((model.blocks[1].attn, "'qkv'"), (model.blocks[0].attn.qkv, "'the MiraProjection given'")):
        with pytest.raises(RuntimeError, match=rf"unload: the MIRA projections \[{kept}\] would stay.*pass the block"):
            mira.unload(part)
    assert all(p.merged_update is not None for p in mira.projections(model))
    assert [dict(m._load_state_dict_pre_hooks) for m in model.modules()] == hooks
    torch.testing.assert_close(model(x), folded, rtol=0, atol=0)
    mira.unfold(model)
    torch.testing.assert_close(model(x), live)
    mira.fold(model, torch.full((3,), 1 / 3))
    mira.unload(model.blocks[0])  # a block: its qkv is replaced, holding the update; the other block still folded
    assert type(model.blocks[0].attn.qkv) is nn.Linear and model.blocks[1].attn.qkv.merged_update is not None
    torch.testing.assert_close(model(x), folded, rtol=0, atol=0)


def _ops(program):
    return sorted(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def test_held_updates_refuse_what_would_be_wrong_and_failed_calls_change_nothing():
    model = trained()
    before = qkv_weights(model)
    with pytest.raises(RuntimeError, match="holds no merged update"):
        mira.unmerge(model)
    mira.set_stage(model, "consolidation")
    with pytest.raises(RuntimeError, match="only the adaptation stage runs"):
        mira.merge(model)
    # Bad fold weights are refused before any weight changes.
    for bad, error, message in [
        (torch.ones(2), ValueError, r"must have shape \(3,\)"),
        (torch.tensor([1.0, float("nan"), 0.0]), ValueError, "not all finite"),
        ({"blocks.0.mira_memory": torch.ones(3)}, KeyError, "memories without slot weights"),
        ("uniform", TypeError, "fold: weights must be"),
        # Finite weights whose update overflows float32 in the last block: refused, no block changed.
        ([torch.zeros(3)] * (DEPTH - 1) + [torch.full((3,), 1e30)], ValueError, "would make .* finite qkv weights inf"),
    ]:
        with pytest.raises(error, match=message):
            mira.fold(model, bad)
        assert all(torch.equal(w, p.base_layer.weight) for w, p in zip(before, mira.projections(model)))
        assert all(p.merged_update is None for p in mira.projections(model))
    mira.fold(model, torch.ones(3))
    with pytest.raises(RuntimeError, match="already holds a folded update; call mira.unfold"):
        mira.fold(model, torch.ones(3))
    with pytest.raises(RuntimeError, match="holds a folded update, not a merged one"):
        mira.unmerge(model)
    with pytest.raises(RuntimeError, match=r"mira.unfold\(model\)\) before switching to the 'adaptation' stage"):
        mira.set_stage(model, "adaptation")
    with pytest.raises(RuntimeError, match="detaching would not restore the backbone"):
        mira.detach(model)
    with pytest.raises(RuntimeError, match="memories do not run"):
        mira.mean_retrieval_weights(model, [images(1)])
    mira.unfold(model)
    mira.detach(model)  # allowed again once the update is out
    with pytest.raises(RuntimeError, match="no MIRA layers"):
        mira.merge(model)


@torch.no_grad()
def test_a_pruned_or_parametrized_base_weight_is_refused_not_merged_into_a_copy():
    """prune / parametrize recompute the weight at every forward: an update written into it would be lost."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Identity(nn.Module):
        def forward(self, w):
            return w

    for reparametrize in (lambda base: prune.l1_unstructured(base, "weight", 0.3),
                          lambda base: parametrize.register_parametrization(base, "weight", Identity())):
        model = trained()
        reparametrize(mira.projections(model)[-1].base_layer)  # the last block: the first was checked before it
        before = qkv_weights(model)
        for call in (mira.merge, lambda m: mira.fold(m, torch.ones(3))):
            with pytest.raises(RuntimeError, match="recomputed at every forward.*nothing was changed"):
                call(model)
            assert all(torch.equal(w, p.base_layer.weight) for w, p in zip(before, mira.projections(model)))
            assert all(p.merged_update is None for p in mira.projections(model))
    # Pruned after a merge: unmerge would subtract from the recomputed copy and leave the update in place.
    model = trained()
    mira.merge(model)
    prune.l1_unstructured(mira.projections(model)[0].base_layer, "weight", 0.3)
    with pytest.raises(RuntimeError, match="recomputed at every forward"):
        mira.unmerge(model)
    assert all(p.merged_update is not None for p in mira.projections(model))


def named_trained(tasks=("a", "b", "a")):
    """trained() with its slots written under task names."""
    model = mira.attach(tiny_vit())
    g = torch.Generator().manual_seed(0)
    for task in tasks:
        fill_loras(model, g)
        mira.write_adapters(model, task=task, generator=g)
    fill_loras(model, g)
    return model


def _state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
@pytest.mark.parametrize("hold", ["fold", "merge"])
@pytest.mark.parametrize("root", ["model", "block", "wrapper", "base-layer"])
def test_load_state_dict_while_an_update_is_held_is_refused_before_anything_loads(hold, root):
    # The refusal was an error_msgs entry of the projection, so PyTorch had loaded every other module
    # by then (memories, LoRA, head) and the slot names were wiped: a failed call changed the model.
    model = named_trained()
    if hold == "fold":
        mira.set_stage(model, "inference")
        mira.fold(model, torch.tensor([0.5, 0.25, 0.25]))
    else:
        mira.merge(model)
    other = trained(slots=2)
    other.head.weight.add_(1.0)
    wrapped = nn.Sequential(model)
    target, state = {"model": (model, other.state_dict()),
                     "block": (model.blocks[1], other.blocks[1].state_dict()),
                     "wrapper": (wrapped, nn.Sequential(other).state_dict()),
                     "base-layer": (model.blocks[1].attn.qkv.base_layer,
                                    other.blocks[1].attn.qkv.base_layer.state_dict())}[root]
    x = images()
    before, names, out = _state_of(model), [m.slot_names for m in mira.memories(model)], model(x)
    held, undo = ("folded", "unfold") if hold == "fold" else ("merged", "unmerge")
    with pytest.raises(RuntimeError, match=rf"holds a {held} update .*nothing was loaded.*mira.{undo}\(model\)"):
        target.load_state_dict(state)
    after = _state_of(model)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                         after[k])]
    assert [m.slot_names for m in mira.memories(model)] == names
    assert torch.equal(model(x), out)
    # A state dict without the held base weights (the head alone) still loads, and taking the update out
    # lets the whole state dict load again.
    model.load_state_dict({"head.weight": other.head.weight}, strict=False)
    assert torch.equal(model.head.weight, other.head.weight)
    getattr(mira, undo)(model)
    model.load_state_dict(other.state_dict())
    assert [m.num_slots for m in mira.memories(model)] == [2] * DEPTH


def _changed(before, model):
    after = _state_of(model)
    return [k for k in before if not torch.equal(before[k], after[k])]


@torch.no_grad()
def test_a_refused_load_begun_above_the_held_model_says_what_had_loaded():
    # The refusal said "nothing was loaded" while the modules before the guarded one had loaded: the
    # backbone's embeddings after merge(model.blocks), the wrapper's layers after a fold of the model.
    other = trained(slots=2)
    for p in other.parameters():
        p.add_(1.0)
    # merge given model.blocks, load from the model: refused before anything by the model's own check.
    model = trained()
    mira.merge(model.blocks)
    before = _state_of(model)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv holds a merged update .*; nothing was loaded: "
                                           r"call mira\.unmerge\(model\) first$"):
        model.load_state_dict(other.state_dict())
    assert not _changed(before, model)
    # Without that check (the model attached by an older version): the guard of model.blocks names what loaded.
    model._load_state_dict_pre_hooks.clear()
    with pytest.raises(RuntimeError, match=r"nothing from 'blocks' on was loaded, but the call began above it and "
                                           r"had already loaded cls_token, pos_embed, patch_embed\.proj\.weight, "
                                           r"patch_embed\.proj\.bias: call mira\.unmerge\(model\) first; to be "
                                           r"refused before anything loads, load from the module mira\.merge was "
                                           r"given, or merge the outermost model"):
        model.load_state_dict(other.state_dict())
    assert sorted(_changed(before, model)) == ["cls_token", "patch_embed.proj.bias", "patch_embed.proj.weight",
                                               "pos_embed"]
    # fold of the model, then a wrapper made after it: its layers before the model have loaded, and it says so.
    model = trained()
    mira.set_stage(model, "inference")
    mira.fold(model, torch.ones(3) / 3)
    wrapper = nn.Sequential(nn.Identity(), nn.Linear(1, 1), model)
    before, pre = _state_of(model), _state_of(wrapper[1])
    with pytest.raises(RuntimeError, match=r"2\.blocks\.0\.attn\.qkv holds a folded update .*nothing from '2' on "
                                           r"was loaded, but the call began above it and had already loaded 1\.weight, "
                                           r"1\.bias: call mira\.unfold\(model\) first; .*fold the outermost model"):
        wrapper.load_state_dict(nn.Sequential(nn.Identity(), nn.Linear(1, 1), other).state_dict())
    assert not _changed(before, model) and _changed(pre, wrapper[1]) == ["weight", "bias"]


@torch.no_grad()
def test_a_copy_of_a_folded_model_refuses_loads_for_itself_and_unfold_leaves_no_hook():
    import copy
    import io

    model = trained()
    hooks_before = [dict(m._load_state_dict_pre_hooks) for m in model.modules()]
    mira.set_stage(model, "inference")
    mira.fold(model, torch.ones(3) / 3)
    state = trained(slots=2).state_dict()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the refusal must not make the model unpicklable
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            copied.load_state_dict(state)
        mira.unfold(copied)
        copied.load_state_dict(state)  # the copy's hook looks at the copy, not at the original
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        model.load_state_dict(state)
    mira.unfold(model)
    assert [dict(m._load_state_dict_pre_hooks) for m in model.modules()] == hooks_before
    mira.fold(model, torch.ones(3) / 3)
    mira.unload(model)  # the update kept in a plain timm model: no refusal left behind
    assert all(not m._load_state_dict_pre_hooks for m in model.modules())


@torch.no_grad()
def test_folding_a_task_of_two_slots_applies_the_product_of_its_mean_factors():
    # What the README says of task_slot_weights: one slot folds to its adapter exactly; k slots fold to
    # mean(B) mean(A), which is none of the task's adapters (the update is bilinear in the weights).
    model = named_trained(("a", "b", "a")).double()
    mira.set_stage(model, "inference")
    x = images(dtype=torch.float64)

    def as_lora(pick):
        reference = mira.attach(tiny_vit()).double()
        for p, memory in zip(mira.projections(reference), mira.memories(model)):
            bank_a, bank_b = memory.stored_adapters
            p.lora_a.copy_(pick(bank_a))
            p.lora_b.copy_(pick(bank_b))
        return reference(x)

    mira.fold(model, mira.task_slot_weights(model, "b"))
    torch.testing.assert_close(model(x), as_lora(lambda bank: bank[1]), rtol=1e-12, atol=1e-12)
    mira.unfold(model)
    mira.fold(model, mira.task_slot_weights(model, "a"))
    folded = model(x)
    torch.testing.assert_close(folded, as_lora(lambda bank: (bank[0] + bank[2]) / 2), rtol=1e-12, atol=1e-12)
    assert min(err(folded, as_lora(lambda bank: bank[0])), err(folded, as_lora(lambda bank: bank[2]))) > 1e-3
