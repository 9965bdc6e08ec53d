"""Saving / loading memories (safetensors, versioned) and importing PEFT LoRA adapters."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mira
from tests.tiny_models import WIDTH, images, peft_vit, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

def trained_memories(**attach_args):
    """An attached model whose memories hold 3 adapters and whose keys / query modules moved."""
    model = mira.attach(tiny_vit(), **attach_args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
            mira.write_adapters(model, generator=g)
        for m in mira.memories(model):
            for p in m.query_module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return mira.set_stage(model, "inference")


ARGS = {"query": "mlp", "key_dim": 24, "query_hidden": 16, "key_norm": "per_feature"}


@pytest.mark.parametrize("save", [mira.save_memories, mira.save_model])
def test_saving_into_a_missing_folder_names_the_path_and_writes_nothing(tmp_path, save):
    # safetensors' own error named its temporary file, not the path the caller gave.
    model = trained_memories()
    target = tmp_path / "no such folder" / "memories.safetensors"
    with pytest.raises(FileNotFoundError, match=r"cannot write .*no such folder.*does not exist"):
        save(model, target)
    assert list(tmp_path.iterdir()) == []


def test_save_then_load_into_a_fresh_model_reproduces_outputs(tmp_path):
    source = trained_memories(**ARGS)
    path = tmp_path / "memories.safetensors"
    mira.save_memories(source, path, metadata={"task": "demo"})
    x = images()
    with torch.no_grad():
        expected = source(x)
        fresh = mira.set_stage(mira.attach(tiny_vit(), **ARGS), "inference")
        assert not torch.equal(fresh(x), expected)
        meta = mira.load_memories(fresh, path)
        assert torch.equal(fresh(x), expected)  # same op, same tensors: bit-identical
        # Into a fixed-capacity memory (slots pre-allocated, 3 of 8 used): same outputs.
        fixed = mira.set_stage(mira.attach(tiny_vit(), capacity=8, **ARGS), "inference")
        mira.load_memories(fixed, path)
        assert [m.num_slots for m in mira.memories(fixed)] == [3, 3]
        # Zero keys of empty slots add exact zeros to the affine sum, but reduce in another order.
        torch.testing.assert_close(fixed(x), expected, rtol=1e-5, atol=1e-5)
    assert meta["task"] == "demo" and meta["format"] == "mira-memories"
    assert meta["format_version"] == str(mira.FORMAT_VERSION) == "2"
    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()["memories"])
        assert sorted(f.keys()) == sorted(f"blocks.{i}.mira_memory.{t}" for i in range(2) for t in (
            "keys", "bank_a", "bank_b", "query_module.fc1.weight", "query_module.fc1.bias",
            "query_module.fc2.weight", "query_module.fc2.bias"))
        assert f.get_tensor("blocks.0.mira_memory.keys").shape == (3, 24)
    entry = described["blocks.1.mira_memory"]
    assert entry["num_slots"] == 3 and entry["slice_offsets"] == [0, 2 * WIDTH]
    assert entry["config"]["query"] == "mlp" and entry["config"]["key_norm"] == "per_feature"


def test_load_refuses_other_configs_versions_and_files(tmp_path):
    path = tmp_path / "m.safetensors"
    mira.save_memories(trained_memories(), path)
    other = mira.attach(tiny_vit(), separation="relu")
    with pytest.raises(ValueError, match="separation: file 'affine', model 'relu'"):
        mira.load_memories(other, path)
    assert all(m.num_slots == 0 for m in mira.memories(other))  # nothing half-loaded
    with pytest.raises(KeyError, match=r"missing from the file: \[\]; in the file but not in the model"):
        mira.load_memories(mira.attach(tiny_vit(), blocks=(0,)), path)
    small = mira.attach(tiny_vit(), capacity=2)
    with pytest.raises(ValueError, match="capacity is 2"):
        mira.load_memories(small, path)

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "v9.safetensors", metadata={**meta, "format_version": "9"})
    with pytest.raises(ValueError, match="format version 9"):
        mira.load_memories(mira.attach(tiny_vit()), tmp_path / "v9.safetensors")
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a MIRA memory file"):
        mira.load_memories(mira.attach(tiny_vit()), tmp_path / "plain.safetensors")


# ----------------------------------------------------------------------------------------------
# PEFT import.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [{"r": 4, "lora_alpha": 8}, {"r": 2, "lora_alpha": 6, "use_rslora": True}],
                         ids=["r4", "r2-rslora-padded"])
def test_peft_packed_qkv_import_reproduces_the_peft_model(tmp_path, lora):
    peft_model = peft_vit(tmp_path, **lora)
    x = images()
    with torch.no_grad():
        expected = peft_model(x)
        assert (expected - tiny_vit()(x)).abs().max() > 1e-3  # the PEFT adapter matters
        # One slot with softmax separation has weight exactly 1: the memory must equal PEFT's LoRA.
        model = mira.attach(tiny_vit(), separation="softmax", scale=0.5)
        assert mira.import_peft(model, tmp_path, into="memory") == [0, 0]
        mira.set_stage(model, "inference")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_peft_import_refuses_k_rows_and_foreign_modules(tmp_path):
    peft_vit(tmp_path / "k", k_rows_zero=False, r=4)
    model = mira.attach(tiny_vit())
    with pytest.raises(ValueError, match="outside MIRA's slices"):
        mira.import_peft(model, tmp_path / "k")
    assert all(m.num_slots == 0 for m in mira.memories(model))
    assert mira.import_peft(model, tmp_path / "k", into="memory", drop_unused_rows=True) == [0, 0]

    peft = pytest.importorskip("peft")
    wide = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, target_modules=["qkv", "proj"]))
    state = peft.get_peft_model_state_dict(wide)
    with pytest.raises(ValueError, match="also adapts"):
        mira.import_peft(mira.attach(tiny_vit()), (state, wide.peft_config["default"]))
    with pytest.raises(ValueError, match="DoRA|use_dora"):
        mira.import_peft(mira.attach(tiny_vit()), (state, {"r": 4, "lora_alpha": 8, "use_dora": True}))
    qkv_only = {k: v for k, v in state.items() if ".qkv." in k}
    with_head = ({**qkv_only, "base_model.model.head.weight": torch.zeros(5, 192)}, wide.peft_config["default"])
    with pytest.raises(ValueError, match="trained tensors that are not LoRA factors.*ignore_unmatched=True"):
        mira.import_peft(mira.attach(tiny_vit()), with_head)
    with pytest.warns(UserWarning, match="not LoRA factors"):
        mira.import_peft(mira.attach(tiny_vit()), with_head, ignore_unmatched=True)
    with pytest.raises(ValueError, match="exceeds the memory's rank 2"):
        mira.import_peft(mira.attach(tiny_vit(), rank=2), (state, wide.peft_config["default"]),
                         ignore_unmatched=True)


def test_peft_separate_q_v_projections_import():
    """LoRA saved on separate q / v projections (PEFT's key layout for a model with q_proj / v_proj)."""
    g = torch.Generator().manual_seed(8)
    r, alpha = 3, 12
    state, factors = {}, {}
    for i in range(2):
        for s, name in (("q", "q_proj"), ("v", "v_proj")):
            a, b = torch.randn(r, WIDTH, generator=g) * 0.1, torch.randn(WIDTH, r, generator=g) * 0.1
            state[f"base_model.model.blocks.{i}.attn.{name}.lora_A.weight"] = a
            state[f"base_model.model.blocks.{i}.attn.{name}.lora_B.weight"] = b
            factors[i, s] = (a, b)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "alpha_pattern": {"1.attn.v_proj": 2 * alpha}}
    model = mira.attach(tiny_vit(), separation="softmax")
    module_names = {"q": "{block}.attn.q_proj", "v": "{block}.attn.v_proj"}
    assert mira.import_peft(model, (state, config), into="memory", module_names=module_names) == [0, 0]
    # The same adapters as a plain LoRA in the adaptation stage, alpha / r folded by hand
    # (alpha_pattern doubles alpha for block 1's v projection).
    reference = mira.attach(tiny_vit())
    with torch.no_grad():
        for i, p in enumerate(mira.projections(reference)):
            for s, name in enumerate(("q", "v")):
                a, b = factors[i, name]
                scaling = (2 * alpha if (i, name) == (1, "v") else alpha) / r
                p.lora_a[s].zero_()
                p.lora_a[s, :r] = a
                p.lora_b[s].zero_()
                p.lora_b[s, :, :r] = b * scaling
        x = images()
        mira.set_stage(model, "inference")
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_a_file_from_before_the_query_hidden_rule_still_loads(tmp_path):
    # Files written when query_hidden was accepted (and inert) beside a query without a hidden
    # layer: the config rule now refuses that pair, the load drops the inert width.
    path = tmp_path / "m.safetensors"
    mira.save_memories(trained_memories(query="identity", key_dim=None, query_hidden=None), path)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    described = json.loads(meta["memories"])
    for entry in described.values():
        entry["config"]["query_hidden"] = 16
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={**meta, "memories": json.dumps(described)})
    model = mira.attach(tiny_vit(), query="identity")
    mira.load_memories(model, old)
    assert [m.num_slots for m in mira.memories(model)] == [3, 3]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_file_of_8_bit_floats_loads_widened_and_its_nan_is_refused_by_name(tmp_path, dtype):
    """A file compressed to 8-bit floats for shipping: every 8-bit value is exact in the model's dtype
    (isfinite has no kernel for float8_e4m3fn, which made the load fail with torch's NotImplementedError)."""
    path = tmp_path / "memories.safetensors"
    mira.save_memories(trained_memories(), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    small = {k: v.to(dtype) for k, v in load_file(path).items()}
    save_file(small, tmp_path / "fp8.safetensors", metadata=meta)
    model = mira.attach(tiny_vit())
    mira.load_memories(model, tmp_path / "fp8.safetensors")
    for name, memory in mira.named_memories(model):
        assert torch.equal(memory.stored_keys, small[f"{name}.keys"].float())
        assert torch.equal(memory.stored_adapters[0], small[f"{name}.bank_a"].float())
    small["blocks.1.mira_memory.keys"] = small["blocks.1.mira_memory.keys"].float().index_fill(
        0, torch.tensor([0]), float("nan")).to(dtype)
    save_file(small, tmp_path / "nan.safetensors", metadata=meta)
    fresh = mira.attach(tiny_vit())
    with pytest.raises(ValueError, match=r"nan.safetensors: blocks.1.mira_memory.keys holds NaN"):
        mira.load_memories(fresh, tmp_path / "nan.safetensors")
    assert all(m.num_slots == 0 for m in mira.memories(fresh))


def test_a_file_from_a_backbone_with_other_prefix_tokens_names_the_architecture(tmp_path):
    # "attach with the same arguments" misled: the prefix count is the backbone's, not an argument.
    path = tmp_path / "m.safetensors"
    mira.save_memories(trained_memories(), path)
    torch.manual_seed(0)
    registers = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  num_classes=5, depth=2, reg_tokens=2).eval()
    model = mira.attach(registers)
    with pytest.raises(ValueError, match=r"backbone with 1 prefix token\(s\) .* this model has 3"):
        mira.load_memories(model, path)
    assert all(m.num_slots == 0 for m in mira.memories(model))


# ----------------------------------------------------------------------------------------------
# Calls on the wrong model or path, named before any work.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_load_memories_into_a_model_without_memories_says_to_attach(tmp_path, strict):
    # strict=True blamed the file ("memories missing from the file: []"), strict=False loaded nothing silently.
    path = tmp_path / "m.safetensors"
    mira.save_memories(trained_memories(), path)
    plain = tiny_vit()
    with pytest.raises(RuntimeError, match=r"load_memories: the model has no MIRA memories \(call mira.attach first\)"):
        mira.load_memories(plain, path, strict=strict)
    assert not mira.memories(plain)


def test_load_memories_not_strict_refuses_a_file_none_of_whose_memories_the_model_has(tmp_path):
    # A file saved from a wrapped model names its memories "0.blocks.0.mira_memory": strict=False matched
    # none of them and returned as if it had loaded.
    path = tmp_path / "wrapped.safetensors"
    mira.save_memories(torch.nn.Sequential(trained_memories()), path)
    model = mira.attach(tiny_vit())
    with pytest.raises(KeyError, match=r"no memory of the file.*'0.blocks.0.mira_memory'.*'blocks.0.mira_memory'"):
        mira.load_memories(model, path, strict=False)
    assert all(m.num_slots == 0 for m in mira.memories(model))
    # Some in common: strict=False loads those (the model attached to block 1 only).
    mira.save_memories(trained_memories(), tmp_path / "both.safetensors")
    one = mira.attach(tiny_vit(), blocks=(1,))
    mira.load_memories(one, tmp_path / "both.safetensors", strict=False)
    assert [m.num_slots for m in mira.memories(one)] == [3]


@pytest.mark.parametrize("save", [mira.save_memories, mira.save_model])
def test_saving_onto_a_directory_names_the_path_and_writes_nothing(tmp_path, save):
    # The error named safetensors' temporary file ("....partial-8559"), not the path the caller gave.
    target = tmp_path / "checkpoints"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"{save.__name__}: cannot write .*checkpoints: it is a directory"):
        save(trained_memories(), target)
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


@pytest.mark.parametrize("entry", [{"note": "\ud800"}, {"\udcff": "x"}], ids=["value", "key"])
def test_metadata_that_is_not_utf8_text_is_refused_by_name_and_writes_nothing(tmp_path, entry):
    # A lone surrogate raised a bare UnicodeEncodeError from inside safetensors.
    with pytest.raises(ValueError, match=r"save_memories: the metadata entry .* is not valid UTF-8 text"):
        mira.save_memories(trained_memories(), tmp_path / "m.safetensors", metadata=entry)
    assert list(tmp_path.iterdir()) == []


def test_import_peft_takes_a_bytes_path_as_save_and_load_do(tmp_path):
    import os

    peft_vit(tmp_path, r=4, lora_alpha=8)
    by_str, by_bytes = mira.attach(tiny_vit()), mira.attach(tiny_vit())
    mira.import_peft(by_str, str(tmp_path))
    mira.import_peft(by_bytes, os.fsencode(tmp_path))
    for a, b in zip(mira.projections(by_str), mira.projections(by_bytes)):
        assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.lora_b, b.lora_b)
    with pytest.raises(FileNotFoundError, match="absent is not a PEFT adapter directory"):
        mira.import_peft(by_bytes, os.fsencode(tmp_path / "absent"))


def test_peft_import_reads_a_named_adapter_from_its_subfolder(tmp_path):
    # save_pretrained writes "default" to the folder and "other" to folder/other/, both with unnamed
    # keys: adapter_name="other" read the folder and imported the default adapter, silently.
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=16, target_modules=["qkv"]))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("attn.qkv"):
                for adapter in ("default", "other"):
                    weight = module.lora_B[adapter].weight
                    weight.copy_(torch.randn(weight.shape, generator=g) * 0.3)
                    weight[WIDTH:2 * WIDTH] = 0
    model.save_pretrained(tmp_path)
    x = images()
    model.eval()
    with torch.no_grad():
        for adapter in ("default", "other"):
            model.set_adapter(adapter)
            imported = mira.attach(tiny_vit())
            mira.import_peft(imported, tmp_path, adapter_name=adapter)
            torch.testing.assert_close(imported(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="holds no adapter named 'third'"):
        mira.import_peft(mira.attach(tiny_vit()), tmp_path, adapter_name="third")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_peft_import_refuses_adapters_whose_initialisation_changed_the_base_weights(init):
    # PiSSA's factors are relative to W - B0 A0, which the adapter file does not hold: added to the
    # original weight they were 0.11 off PEFT's outputs, without a word.
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, target_modules=["qkv"]))
    state = peft.get_peft_model_state_dict(adapted)
    model = mira.attach(tiny_vit())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}', which changes the base weights"):
        mira.import_peft(model, (state, {"r": 4, "lora_alpha": 8, "init_lora_weights": init}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_refused_peft_import_into_the_lora_leaves_the_generator_as_it_was():
    g = torch.Generator().manual_seed(2)
    state = {}
    for i in range(2):
        b = torch.randn(3 * WIDTH, 2, generator=g)
        b[WIDTH:2 * WIDTH] = 0
        state[f"base_model.model.blocks.{i}.attn.qkv.lora_A.weight"] = torch.randn(2, WIDTH, generator=g)
        state[f"base_model.model.blocks.{i}.attn.qkv.lora_B.weight"] = b
    generator = torch.Generator().manual_seed(7)
    before = generator.get_state().clone()
    with pytest.raises(ValueError, match="too large for the model's torch.float32"):  # rank 2 < 4: rows are drawn
        mira.import_peft(mira.attach(tiny_vit()), (state, {"r": 2, "lora_alpha": 4e39}), generator=generator)
    assert torch.equal(generator.get_state(), before)


def _unsaved_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "without state that changes the model's outputs" in str(w.message)]


@pytest.mark.parametrize("save", [mira.save_memories, mira.save_model])
def test_saving_warns_of_a_live_lora_and_a_held_update_that_the_file_does_not_hold(tmp_path, save):
    # A live LoRA (import_peft's default target, or one trained in the adaptation stage) and a fold
    # were dropped without a word: the loaded model was the bare backbone's (0.44 off PEFT's outputs).
    import warnings

    path = tmp_path / "m.safetensors"
    model = trained_memories()  # its live LoRA was written (write_adapters resets it): nothing lost
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        save(model, path)
    assert _unsaved_warnings(record) == []
    with torch.no_grad():
        mira.projections(model)[1].lora_b.normal_(generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"of its 2 MIRA projections, 1 hold a live adaptation LoRA that is not in "
                                         r"the memory .*mira\.write_adapters\(model\)") as record:
        save(model, path)
    assert len(_unsaved_warnings(record)) == 1
    mira.write_adapters(model, reset=False)  # stored now, and still live: the file holds it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        save(model, path)
    assert _unsaved_warnings(record) == []
    mira.fold(model, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    with pytest.warns(UserWarning, match=r"2 hold a folded mixture .*mira\.unfold\(model\).*slot_weights"):
        save(model, path)
    mira.unfold(model)
    with torch.no_grad():
        for proj in mira.projections(model):
            proj.lora_b.normal_(generator=torch.Generator().manual_seed(2))
    mira.merge(mira.set_stage(model, "adaptation"))
    with pytest.warns(UserWarning, match=r"2 hold a live adaptation LoRA .*; 2 hold a merged LoRA .*mira\.unmerge"):
        save(model, path)
    mira.load_memories(mira.attach(tiny_vit()), path)  # the format is unchanged


def _with_zero_key(tmp_path, source, slot):
    """A copy of ``source``'s memory file with slot ``slot`` of blocks.0's keys zeroed."""
    mira.save_memories(source, tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.mira_memory.keys"][slot] = 0
    save_file(tensors, tmp_path / "zero.safetensors", metadata=meta)
    return tmp_path / "zero.safetensors"


def test_a_stored_adapter_with_an_all_zero_key_is_refused_by_every_load(tmp_path):
    # append refuses a zero key (no direction; the op's gradient of it is g / eps, ~4e13 in the
    # consolidation stage), but the loaders took one from a file or a state dict.
    source = trained_memories()
    zero = _with_zero_key(tmp_path, source, 1)
    model = mira.attach(tiny_vit())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"zero.safetensors: blocks.0.mira_memory: the keys of slots \[1\] are all "
                                         "zeros; a stored adapter's key needs a direction"):
        mira.load_memories(model, zero)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    mira.save_model(source, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.mira_memory.keys"][2] = 0
    save_file(tensors, tmp_path / "zero_model.safetensors", metadata=meta)
    backbone = tiny_vit()
    with pytest.raises(ValueError, match=r"the keys of slots \[2\] are all zeros"):
        mira.load_model(backbone, tmp_path / "zero_model.safetensors")
    assert mira.projections(backbone) == []
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["blocks.1.mira_memory.keys"][0] = 0
    with pytest.raises(RuntimeError, match=r"blocks.1.mira_memory.keys of the stored slots \[0\] are all zeros"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_fixed_capacity_memory_with_empty_slots_round_trips_but_a_used_slot_with_a_zero_key_does_not(tmp_path):
    # Empty slots hold zero keys by design: only the slots the mask marks used are checked.
    source = trained_memories(capacity=5, separation="relu")
    path = tmp_path / "m.safetensors"
    mira.save_memories(source, path)
    model = mira.attach(tiny_vit(), capacity=5, separation="relu")
    mira.load_memories(model, path)
    assert [m.num_slots for m in mira.memories(model)] == [3, 3]
    model.load_state_dict(source.state_dict())
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["blocks.0.mira_memory.active"][3] = True  # slot 3 used, with the zero key of an empty slot
    with pytest.raises(RuntimeError, match=r"blocks.0.mira_memory.keys of the stored slots \[3\] are all zeros"):
        model.load_state_dict(state)
    memory = mira.memories(model)[0]
    with pytest.raises(RuntimeError, match=r"keys of the stored slots \[3\] are all zeros"):  # the mask alone
        memory.load_state_dict({"active": state["blocks.0.mira_memory.active"]}, strict=False)
    assert memory.num_slots == 3


def test_import_peft_says_a_full_peft_state_dict_is_not_the_adapters_own(tmp_path):
    # peft_model.state_dict() was refused as holding "trained tensors that are not LoRA factors"
    # (its frozen backbone), which sent users looking for modules_to_save they never had.
    peft = pytest.importorskip("peft")
    pm = peft_vit(tmp_path, r=4, lora_alpha=8)
    config = pm.peft_config["default"]
    model = mira.attach(tiny_vit())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"looks like a full PeftModel.state_dict\(\).*cls_token.*"
                                         r"peft.get_peft_model_state_dict\(peft_model\)"):
        mira.import_peft(model, (pm.state_dict(), config))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = images()
    with torch.no_grad():
        mira.import_peft(model, (peft.get_peft_model_state_dict(pm), config))
        torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-5)
        other = mira.attach(tiny_vit())
        with pytest.warns(UserWarning, match="looks like a full PeftModel.state_dict"):
            mira.import_peft(other, (pm.state_dict(), config), ignore_unmatched=True)
        torch.testing.assert_close(other(x), pm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, error", [(None, TypeError), (3, TypeError), (b"default", TypeError), ("", ValueError),
                                         ("a/b", ValueError), ("..", ValueError)])
def test_import_peft_refuses_an_adapter_name_that_names_no_adapter(tmp_path, name, error):
    # None / 3 / b"x" raised os.path's bare TypeErrors, and "" read the folder's "default" adapter.
    pm = peft_vit(tmp_path, r=4, lora_alpha=8)
    model = mira.attach(tiny_vit())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    for source in (tmp_path, (state, pm.peft_config["default"])):
        with pytest.raises(error, match=f"import_peft: adapter_name must be .*got {re.escape(repr(name))}"):
            mira.import_peft(model, source, adapter_name=name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
