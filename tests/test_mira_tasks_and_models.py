"""Named tasks and slots, whole-model save / load, the file format's version 2 (and version 1 still loading),
and import_peft's default (the live LoRA, which reproduces PEFT)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mira
from tests.tiny_models import WIDTH, images, peft_vit, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

def write_tasks(model, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    for task in tasks:
        with torch.no_grad():
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
        mira.write_adapters(model, task=task, generator=g)
    return model


@pytest.mark.parametrize("capacity", [None, 6])
def test_named_tasks_list_remove_and_select_by_name(capacity):
    model = write_tasks(mira.attach(tiny_vit(), capacity=capacity), ["photo", "sketch", "photo", "cartoon"])
    mira.memories(model)[0].append(*[t[:1] for t in mira.memories(model)[0].stored_adapters])  # one unnamed slot
    with pytest.raises(ValueError, match="the memories hold different slots"):
        mira.task_slots(model)
    mira.memories(model)[1].append(*[t[:1] for t in mira.memories(model)[1].stored_adapters])
    assert mira.task_slots(model) == {"photo": [0, 2], "sketch": [1], "cartoon": [3], None: [4]}
    memory = mira.memories(model)[0]
    assert memory.slot_names == ("photo", "sketch", "photo", "cartoon", None)
    values = {name: memory.stored_adapters[0][i].clone() for i, name in enumerate(memory.slot_names) if name}

    before = [(m.stored_keys.clone(), m.slot_names) for m in mira.memories(model)]
    with pytest.raises(KeyError, match=r"no slot named \['painting'\]"):
        mira.remove_tasks(model, ["sketch", "painting"])
    assert all(torch.equal(k, m.stored_keys) and n == m.slot_names for (k, n), m in zip(before, mira.memories(model)))
    assert mira.remove_tasks(model, "sketch") == [1, 1]
    assert mira.task_slots(model) == {"photo": [0, 1], "cartoon": [2], None: [3]}
    assert torch.equal(memory.stored_adapters[0][2], values["cartoon"])  # the values moved with their names
    assert mira.select_tasks(model, ["cartoon", "photo"]) == [3, 3]  # slot order kept, unnamed slot gone
    assert memory.slot_names == ("photo", "photo", "cartoon")
    memory.remove("cartoon")  # the memory itself also removes by name
    assert memory.slot_names == ("photo", "photo") and memory.num_slots == 2
    with pytest.raises(TypeError, match="non-empty str"):
        mira.write_adapters(model, task="")


@torch.no_grad()
def test_fold_one_task_by_name_deploys_its_adapter():
    """Softmax over the full memory vs the folded task: with task weights 1 on one slot, the
    folded model equals the adaptation-stage model running that stored adapter as its LoRA."""
    model = write_tasks(mira.attach(tiny_vit(), separation="softmax"), ["photo", "sketch"])
    weights = mira.task_slot_weights(model, "sketch")
    assert all(w.tolist() == [0.0, 1.0] for w in weights.values())
    x = images()
    reference = mira.attach(tiny_vit())
    for p, memory in zip(mira.projections(reference), mira.memories(model)):
        p.lora_a.copy_(memory.stored_adapters[0][1])
        p.lora_b.copy_(memory.stored_adapters[1][1])
    mira.fold(model, weights)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


# Non-default options, key_init included: the saved attach config must carry every MiraConfig field.
ARGS = {"query": "mlp", "key_dim": 24, "query_hidden": 16, "capacity": 8, "blocks": (0, 2), "key_init": "normal",
        "key_norm": "unit"}


def trained_model():
    model = write_tasks(mira.attach(tiny_vit(depth=3), **ARGS), ["a", "b", "a"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in mira.memories(model):
            for p in m.query_module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=g))
    return mira.set_stage(model, "inference")


def test_save_model_then_load_model_into_a_fresh_backbone_in_one_call(tmp_path):
    source = trained_model()
    path = tmp_path / "model.safetensors"
    mira.save_model(source, path, metadata={"dataset": "digits"})
    x = images()
    with torch.no_grad():
        expected = source(x)
    fresh = tiny_vit(depth=3)
    assert mira.load_model(fresh, path) is fresh
    assert mira.config_of(fresh) == mira.config_of(source) == mira.MiraConfig(rank=4, key_dim=24, **{
        k: v for k, v in ARGS.items() if k != "key_dim"})
    assert not fresh.training and {p.stage for p in mira.projections(fresh)} == {"inference"}
    assert mira.task_slots(fresh) == {"a": [0, 2], "b": [1]}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)  # the head came along
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert "modules/head.weight" in f.keys() and "modules/head.bias" in f.keys()
    assert meta["format_version"] == "2" and meta["dataset"] == "digits" and json.loads(meta["modules"]) == ["head"]
    described = json.loads(meta["memories"])
    assert described["blocks.2.mira_memory"]["slot_names"] == ["a", "b", "a"]
    # A memory file (save_memories) loads with load_memories, slot names included, and ignores no tensor.
    mira.save_memories(source, tmp_path / "memories.safetensors")
    other = mira.attach(tiny_vit(depth=3), **ARGS)
    mira.load_memories(other, tmp_path / "memories.safetensors")
    assert mira.task_slots(other) == {"a": [0, 2], "b": [1]}


def test_load_model_refuses_clearly_and_leaves_the_backbone_as_it_was(tmp_path):
    path = tmp_path / "model.safetensors"
    mira.save_model(trained_model(), path)
    other_head = tiny_vit(depth=3, num_classes=7)
    state = {k: v.clone() for k, v in other_head.state_dict().items()}
    with pytest.raises(ValueError, match=r"head.weight has shape \(5, 192\), the backbone's \(7, 192\)"):
        mira.load_model(other_head, path)
    assert not mira.projections(other_head)
    assert sorted(other_head.state_dict()) == sorted(state)
    with pytest.raises(RuntimeError, match="already has MIRA layers"):
        mira.load_model(mira.attach(tiny_vit(depth=3)), path)
    with pytest.raises(KeyError, match="no module named 'classifier'"):
        mira.save_model(trained_model(), path, modules=("classifier",))
    with pytest.raises(ValueError, match="contains MIRA layers"):
        mira.save_model(trained_model(), path, modules=("blocks",))
    for inside in ("blocks.0.attn.qkv.base_layer", "blocks.0.mira_memory.query_module"):  # were saved as modules
        with pytest.raises(ValueError, match=rf"{inside.replace('.', '[.]')}' is part of the MIRA layer"):
            mira.save_model(trained_model(), path, modules=(inside,))
    with pytest.raises(ValueError, match="reserved"):
        mira.save_model(trained_model(), path, metadata={"attach_config": "{}"})


def _as_version_1(path, out):
    """The file a version-1 writer produced: no slot names, no attach config, no modules, and (before
    key_init existed) no key_init in the memory configs."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    described = json.loads(meta["memories"])
    for entry in described.values():
        del entry["slot_names"]
        del entry["config"]["key_init"]
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("modules/")}
    v1 = {k: v for k, v in meta.items() if k not in ("attach_config", "modules")}
    save_file(tensors, out, metadata={**v1, "format_version": "1", "memories": json.dumps(described)})


def test_version_1_files_still_load_and_newer_ones_are_refused(tmp_path):
    source = trained_model()
    mira.save_model(source, tmp_path / "v2.safetensors")
    _as_version_1(tmp_path / "v2.safetensors", tmp_path / "v1.safetensors")
    model = mira.attach(tiny_vit(depth=3), **ARGS)
    meta = mira.load_memories(model, tmp_path / "v1.safetensors")
    assert meta["format_version"] == "1"
    assert mira.task_slots(model) == {None: [0, 1, 2]}  # version 1 had no names
    mira.set_stage(model, "inference")
    x = images()
    with torch.no_grad():
        model.head.load_state_dict(source.head.state_dict())
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"format version 1.*mira.load_memories\(model, path\)"):
        mira.load_model(tiny_vit(depth=3), tmp_path / "v1.safetensors")
    tensors = load_file(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "v3.safetensors", metadata={**meta, "format_version": "3"})
    with pytest.raises(ValueError, match=r"format version 3; this version reads 1\.\.2"):
        mira.load_model(tiny_vit(depth=3), tmp_path / "v3.safetensors")
    bad_names = json.loads(meta["memories"])
    bad_names["blocks.0.mira_memory"]["slot_names"] = ["a"]
    save_file(tensors, tmp_path / "bad.safetensors", metadata={**meta, "memories": json.dumps(bad_names)})
    fresh = tiny_vit(depth=3)
    with pytest.raises(ValueError, match="slot_names must be a list of 3"):
        mira.load_model(fresh, tmp_path / "bad.safetensors")
    assert not mira.projections(fresh)  # attached, the load failed, detached again


# ----------------------------------------------------------------------------------------------
# import_peft: the live LoRA by default.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_import_peft_reproduces_the_peft_model_by_default(tmp_path):
    peft_model = peft_vit(tmp_path, r=4, lora_alpha=8)
    x = images()
    expected = peft_model(x)
    model = mira.attach(tiny_vit())  # default affine separation: the memory's one-slot rule would differ
    assert mira.import_peft(model, tmp_path) == []
    assert all(m.num_slots == 0 for m in mira.memories(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    mira.merge(model)  # and merged, as PEFT's merge_and_unload
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    mira.unmerge(model)
    # Into the memory, the authors' rule for one slot: weight = the raw cosine, so outputs differ.
    assert mira.import_peft(model, tmp_path, into="memory", task="peft") == [0, 0]
    assert mira.task_slots(model) == {"peft": [0]}
    mira.set_stage(model, "inference")
    assert (model(x) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="into='memory' to use them"):
        mira.import_peft(model, tmp_path, task="peft")
    with pytest.raises(ValueError, match="into must be"):
        mira.import_peft(model, tmp_path, into="bank")


@torch.no_grad()
def test_peft_lora_with_nonzero_k_rows_imports_exactly_with_a_k_slice(tmp_path):
    peft_model = peft_vit(tmp_path, k_rows_zero=False, r=4, lora_alpha=8)
    x = images()
    with pytest.raises(ValueError, match="outside MIRA's slices"):
        mira.import_peft(mira.attach(tiny_vit()), tmp_path)
    model = mira.attach(tiny_vit(), slices=("q", "k", "v"))
    mira.import_peft(model, tmp_path)
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_import_peft_into_the_lora_refuses_factors_that_overflow_and_changes_nothing():
    model = mira.attach(tiny_vit())
    g = torch.Generator().manual_seed(2)
    lora_b = torch.randn(3 * WIDTH, 4, generator=g)
    lora_b[WIDTH:2 * WIDTH] = 0  # no k rows
    state = {f"base_model.model.blocks.{i}.attn.qkv.lora_{f}.weight": t for i in range(2)
             for f, t in (("A", torch.randn(4, WIDTH, generator=g)), ("B", lora_b))}
    before = [(p.lora_a.clone(), p.lora_b.clone()) for p in mira.projections(model)]
    with pytest.raises(ValueError, match="too large for the model's torch.float32; nothing was changed"):
        mira.import_peft(model, (state, {"peft_type": "LORA", "r": 4, "lora_alpha": 4e39}))
    assert all(torch.equal(a, p.lora_a) and torch.equal(b, p.lora_b)
               for (a, b), p in zip(before, mira.projections(model)))
    mira.import_peft(model, (state, {"peft_type": "LORA", "r": 4, "lora_alpha": 8}))  # a sane alpha imports
    assert not torch.equal(before[0][1], mira.projections(model)[0].lora_b)


def test_save_model_keeps_both_heads_of_a_distilled_deit(tmp_path):
    """A distilled DeiT averages head and head_dist: both are saved by default, or the loaded model
    would run the fresh backbone's random head_dist."""
    import timm

    def deit(head_seed):
        """The same backbone (the pretrained weights), heads initialised from head_seed (new classes)."""
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  num_classes=5, depth=2).eval()
        torch.manual_seed(head_seed)
        model.head.reset_parameters()
        model.head_dist.reset_parameters()
        return model

    source = mira.set_stage(mira.attach(deit(0)), "inference")
    path = tmp_path / "deit.safetensors"
    mira.save_model(source, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["modules"]) == ["head", "head_dist"]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(mira.load_model(deit(1), path)(x), source(x), rtol=0, atol=0)


def test_save_and_load_name_what_is_wrong_with_metadata_paths_and_dtypes(tmp_path):
    # A review of the file format (2026-12-07): safetensors' error for non-text metadata named
    # neither the entry nor the call; a bytes path wrote a file named "b'...'"; a hand-edited float
    # head stored as integers loaded unchecked (and a float into an integer buffer would truncate).
    source = trained_model()
    with pytest.raises(TypeError, match=r"save_model: metadata keys and values must be str .*'epoch': 3"):
        mira.save_model(source, tmp_path / "m.safetensors", metadata={"epoch": 3})
    assert not list(tmp_path.iterdir())
    path = tmp_path / "model.safetensors"
    mira.save_model(source, os.fsencode(path))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    fresh = mira.load_model(tiny_vit(depth=3), os.fsencode(path))
    assert torch.equal(fresh.head.weight, source.head.weight)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["modules/head.weight"] = tensors["modules/head.weight"].mul(100).to(torch.int64)
    save_file(tensors, tmp_path / "int_head.safetensors", metadata=meta)
    backbone = tiny_vit(depth=3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(TypeError, match=r"head.weight has dtype torch.int64, the backbone's torch.float32"):
        mira.load_model(backbone, tmp_path / "int_head.safetensors")
    assert mira.memories(backbone) == [] and all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize("options", [{}, {"query": "linear", "key_dim": 32}, {"query": "mlp", "query_hidden": 48}])
def test_a_model_whose_blocks_differ_in_width_saves_and_loads_in_one_call(tmp_path, options):
    # PiT's stages are 64, 128 and 256 wide. config_of read the resolved key width of each block,
    # found three, and refused the model as "attached with different options": save_model failed.
    import timm

    def pit():
        torch.manual_seed(0)
        return timm.create_model("pit_ti_distilled_224", pretrained=False, num_classes=5).eval()

    source = write_tasks(mira.attach(pit(), **options), ["a", "b"])
    assert len({m.config.d_in for m in mira.memories(source)}) == 3
    assert mira.config_of(source) == mira.MiraConfig(**options)
    path = tmp_path / "pit.safetensors"
    mira.save_model(mira.set_stage(source, "inference"), path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mira.load_model(pit(), path)(x), source(x), rtol=0, atol=0)


def test_config_of_names_width_options_the_blocks_do_not_share():
    model = mira.attach(tiny_vit(depth=2), query="linear", key_dim=24)
    mira.memories(model)[1].config.d_k = 32  # as if the blocks had been attached one by one
    with pytest.raises(ValueError, match=r"different key_dim values: \[24, 32\] for block widths \[192, 192\]"):
        mira.config_of(model)


def test_query_hidden_left_to_its_default_and_given_as_the_block_width_load_into_each_other(tmp_path):
    # Both build the same MLP query module; the file check compared the raw option (None vs 192).
    path = tmp_path / "memories.safetensors"
    source = write_tasks(mira.attach(tiny_vit(), query="mlp"), ["a"])
    mira.save_memories(source, path)
    target = mira.attach(tiny_vit(), query="mlp", query_hidden=WIDTH)
    mira.load_memories(target, path)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    mira.save_memories(target, path)
    mira.load_memories(mira.attach(tiny_vit(), query="mlp"), path)
    with pytest.raises(ValueError, match="query_hidden: file 192, model 16"):
        mira.load_memories(mira.attach(tiny_vit(), query="mlp", query_hidden=16), path)
