"""A failed mutating call changes nothing (issue 15): load_memories, load_state_dict, write_adapters,
import_peft. Each case builds a model whose memories already hold adapters, makes a call that must
fail on its *last* block (so a call that applies block by block would have changed the first), and
checks the error and that every memory, LoRA and generator is bitwise what it was.

Also: file errors name the file and the cause.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mira
from tests.tiny_models import filled_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

IMG, WIDTH = 32, 192
ARGS = {"query": "mlp", "key_dim": 24, "query_hidden": 16}


def tiny_vit(depth=2):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, num_classes=5,
                             depth=depth).eval()


def filled(seed=3, n=2, **attach_args):
    """An attached model whose memories hold ``n`` adapters, query modules moved, LoRAs non-zero."""
    return filled_vit(seed, n, move_query=True, **{**ARGS, **attach_args})


def snapshot(model, loras=True):
    """Every MIRA tensor (memories' state, LoRAs) and slot count, cloned."""
    state = {}
    for name, m in mira.named_memories(model):
        state[name + ".num_slots"] = m.num_slots
        for k, v in m.state_dict().items():
            state[f"{name}.{k}"] = v.clone()
    for i, p in enumerate(mira.projections(model) if loras else ()):
        state[f"lora{i}"] = (p.lora_a.detach().clone(), p.lora_b.detach().clone())
    return state


def assert_unchanged(model, before, loras=True):
    after = snapshot(model, loras)
    assert after.keys() == before.keys()
    for k, v in before.items():
        w = after[k]
        if isinstance(v, torch.Tensor):
            assert v.shape == w.shape and v.dtype == w.dtype and torch.equal(v, w), f"{k} changed"
        elif isinstance(v, tuple):
            assert all(torch.equal(a, b) for a, b in zip(v, w)), f"{k} changed"
        else:
            assert v == w, f"{k}: {v} -> {w}"


# ----------------------------------------------------------------------------------------------
# load_memories
# ----------------------------------------------------------------------------------------------

LAST = "blocks.1.mira_memory"


def _corrupt(tensors, meta):
    return tensors, meta


def _set(key, fn):
    def corrupt(tensors, meta):
        tensors[key] = fn(tensors[key])
        return tensors, meta

    return corrupt


def _drop(key):
    def corrupt(tensors, meta):
        del tensors[key]
        return tensors, meta

    return corrupt


def _add(key, value):
    def corrupt(tensors, meta):
        tensors[key] = value
        return tensors, meta

    return corrupt


def _meta(fn):
    def corrupt(tensors, meta):
        described = json.loads(meta["memories"])
        fn(described[LAST])
        return tensors, {**meta, "memories": json.dumps(described)}

    return corrupt


def _nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


FILE_CASES = {
    "bank_a width": (_set(f"{LAST}.bank_a", lambda t: t[..., :-1].contiguous()), ValueError, r"bank_a.*shape"),
    "bank_b width": (_set(f"{LAST}.bank_b", lambda t: t[:, :, :-1].contiguous()), ValueError, r"bank_b.*shape"),
    "key width": (_set(f"{LAST}.keys", lambda t: t[:, :-1].contiguous()), ValueError, r"keys.*shape"),
    "keys vs banks count": (_set(f"{LAST}.keys", lambda t: t[:1].contiguous()), ValueError, r"keys.*shape|adapters"),
    "banks count": (_set(f"{LAST}.bank_b", lambda t: t[:1].contiguous()), ValueError, r"bank_b.*shape"),
    "num_slots vs tensors": (_meta(lambda e: e.update(num_slots=2)), ValueError, r"num_slots|shape"),
    "missing keys tensor": (_drop(f"{LAST}.keys"), ValueError, r"keys.*missing|missing.*keys"),
    "extra query tensor": (_add(f"{LAST}.query_module.fc3.weight", torch.zeros(2, 2)), ValueError,
                           r"query_module.*fc3"),
    "missing query tensor": (_drop(f"{LAST}.query_module.fc2.bias"), ValueError, r"query_module.*fc2.bias"),
    "mis-shaped query tensor": (_set(f"{LAST}.query_module.fc1.weight", lambda t: t[:-1].contiguous()), ValueError,
                                r"query_module.*fc1.weight"),
    "query tensor dtype": (_set(f"{LAST}.query_module.fc1.bias", lambda t: t.to(torch.int32)), TypeError,
                           r"fc1.bias.*dtype|dtype.*fc1.bias"),
    "NaN key": (_set(f"{LAST}.keys", _nan_first), ValueError, r"keys.*(NaN|non-finite)"),
    "inf bank": (_set(f"{LAST}.bank_b", lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))), ValueError,
                 r"bank_b.*(inf|non-finite)"),
    "NaN query parameter": (_set(f"{LAST}.query_module.fc2.weight", _nan_first), ValueError,
                            r"fc2.weight.*(NaN|non-finite)"),
    "bad slice_offsets entry": (_meta(lambda e: e.update(slice_offsets=[0, 1])), ValueError, "slice_offsets"),
    "config not a dict": (_meta(lambda e: e.update(config=7)), ValueError, "config"),
}


def _write_corrupted(tmp_path, corrupt):
    path = tmp_path / "good.safetensors"
    mira.save_memories(filled(seed=11, n=3), path)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors, meta = corrupt(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    return bad


@pytest.mark.parametrize("case", list(FILE_CASES))
@pytest.mark.parametrize("capacity", [None, 4], ids=["growing", "fixed"])
def test_load_memories_with_one_bad_tensor_changes_nothing(tmp_path, case, capacity):
    corrupt, exc, msg = FILE_CASES[case]
    bad = _write_corrupted(tmp_path, corrupt)
    model = filled(capacity=capacity)
    before = snapshot(model)
    with pytest.raises(exc, match=msg) as info:
        mira.load_memories(model, bad)
    assert "bad.safetensors" in str(info.value), "the error names the file"
    assert_unchanged(model, before)


def test_load_memories_too_many_slots_for_the_capacity_changes_nothing(tmp_path):
    path = tmp_path / "five.safetensors"
    mira.save_memories(filled(seed=5, n=5), path)
    model = filled(capacity=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="capacity is 4"):
        mira.load_memories(model, path)
    assert_unchanged(model, before)


def test_a_good_file_still_loads_after_the_checks(tmp_path):
    path = tmp_path / "good.safetensors"
    source = filled(seed=11, n=3)
    mira.save_memories(source, path)
    model = filled(capacity=4)
    mira.load_memories(model, path)
    for (_, a), (_, b) in zip(mira.named_memories(source), mira.named_memories(model)):
        assert b.num_slots == 3 and torch.equal(a.stored_keys, b.stored_keys)
        assert all(torch.equal(x, y) for x, y in zip(a.stored_adapters, b.stored_adapters))


def _metadata_file(tmp_path, **changes):
    path = tmp_path / "good.safetensors"
    mira.save_memories(filled(seed=11), path)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    out = tmp_path / "meta.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (lambda p: p, IsADirectoryError, "is a directory"),
        (lambda p: p / "absent.safetensors", FileNotFoundError, "absent.safetensors"),
        (lambda p: (p / "junk.safetensors").write_bytes(b"\x00" * 40) and p / "junk.safetensors", ValueError,
         "junk.safetensors.*(not a safetensors|cannot be read)"),
        (lambda p: _metadata_file(p, format_version="one"), ValueError, "meta.safetensors.*format_version 'one'"),
        (lambda p: _metadata_file(p, format_version=None), ValueError, "meta.safetensors.*format_version.*missing"),
        (lambda p: _metadata_file(p, memories=None), ValueError, "meta.safetensors.*'memories'.*missing"),
        (lambda p: _metadata_file(p, memories="{not json"), ValueError, "meta.safetensors.*'memories'.*JSON"),
        (lambda p: _metadata_file(p, memories="[1, 2]"), ValueError, "meta.safetensors.*'memories'"),
    ],
    ids=["directory", "missing", "not-safetensors", "version-text", "no-version", "no-memories", "broken-json",
         "memories-not-object"],
)
def test_file_errors_name_the_file_and_the_cause(tmp_path, make, exc, msg):
    path = make(tmp_path)
    model = filled()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.load_memories(model, path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# load_state_dict
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [dict(rank=2), dict(rank=2, n=3), dict(key_dim=16, n=3), dict(query_hidden=8), dict(query_hidden=8, n=3)],
    ids=["rank", "rank+slots", "key-width+slots", "query-hidden", "query-hidden+slots"],
)
def test_load_state_dict_of_another_model_changes_no_memory(other):
    n = other.pop("n", 2)
    source = filled(seed=9, n=n, **other)
    model = filled()
    before = snapshot(model, loras=False)
    with pytest.raises(RuntimeError, match="size mismatch|mira_memory"):
        model.load_state_dict(source.state_dict())
    # The memories here; the whole model is left as it was too (the tests of the attach root's check below).
    assert_unchanged(model, before, loras=False)


@pytest.mark.parametrize("entry", ["keys", "bank_a", "bank_b"])
@pytest.mark.parametrize("n", [2, 3], ids=["same-slots", "resize"])
def test_load_state_dict_with_non_finite_memory_entries_changes_no_memory(entry, n):
    # append and the file loaders refused NaN and inf; a state dict of a run that diverged loaded them.
    state = filled(seed=9, n=n).state_dict()
    for name in [k for k in state if k.endswith(f"mira_memory.{entry}")]:  # every block's memory
        state[name] = state[name].clone()
        state[name].view(-1)[1] = float("nan") if entry == "keys" else float("inf")
    model = filled()
    before = snapshot(model, loras=False)
    with pytest.raises(RuntimeError, match="NaN or inf values"):
        model.load_state_dict(state)
    assert_unchanged(model, before, loras=False)


def test_load_state_dict_of_another_slot_count_still_resizes():
    source = filled(seed=9, n=3)
    model = filled()
    model.load_state_dict(source.state_dict())
    for a, b in zip(mira.memories(source), mira.memories(model)):
        assert b.num_slots == 3 and torch.equal(a.keys, b.keys) and torch.equal(a.bank_b, b.bank_b)


def whole_state(model):
    """Every tensor of the model's state dict (backbone, head, memories, LoRAs), cloned, and the slot counts."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.num_slots for m in mira.memories(model)])


def assert_whole_state_unchanged(model, before):
    state, slots = whole_state(model)
    assert slots == before[1]
    assert sorted(state) == sorted(before[0])
    changed = [k for k, v in before[0].items() if v.shape != state[k].shape or not torch.equal(v, state[k])]
    assert not changed, changed


@pytest.mark.parametrize("strict", [True, False])
def test_a_load_state_dict_refused_by_the_last_memory_changes_no_memory_before_it(strict):
    # Each memory protected itself only: with block 1's entries malformed, block 0's memory had loaded
    # (resized to 3 slots) by the time block 1 refused, and the model ended with slot counts [3, 2].
    state = filled(seed=9, n=3).state_dict()
    bad = "blocks.1.mira_memory.bank_a"
    state[bad] = state[bad][:, :, :1].clone()  # rank 1 instead of 4
    model = filled()
    before = whole_state(model)
    with pytest.raises(RuntimeError, match=r"(?s)blocks\.1\.mira_memory .*was not loaded.*nothing was loaded"):
        model.load_state_dict(state, strict=strict)
    assert_whole_state_unchanged(model, before)


@pytest.mark.parametrize("strict", [True, False])
def test_a_load_state_dict_refused_for_the_head_changes_no_memory(strict):
    # torch copies every tensor that fits and raises at the end: every memory had been replaced.
    state = filled(seed=9, n=3).state_dict()
    state["head.weight"] = torch.zeros(7, state["head.weight"].shape[1])  # a head of another class count
    model = filled()
    before = whole_state(model)
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.weight.*\n.*nothing was loaded"):
        model.load_state_dict(state, strict=strict)
    assert_whole_state_unchanged(model, before)


def test_a_load_state_dict_is_checked_whole_by_torchs_rules_under_the_callers_strict():
    model = filled()
    model.register_buffer("temperature", torch.tensor(1.0))  # 0-dim, as some heads have
    source = filled(seed=9, n=3)
    source.register_buffer("temperature", torch.tensor(2.0))
    state = source.state_dict()
    state["temperature"] = torch.tensor([2.0])  # (1,): torch's rule for checkpoints of PyTorch 0.3 loads it
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    extra = {**state, "head.extra": torch.zeros(3)}
    before = whole_state(model)
    # strict=True: torch raises for missing and unexpected keys only after loading all that fits.
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "norm\.weight"'):
        model.load_state_dict(missing)
    assert_whole_state_unchanged(model, before)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "head\.extra"'):
        model.load_state_dict(extra)
    assert_whole_state_unchanged(model, before)
    # strict=False: those load (what torch accepts is accepted), a misfit still changes nothing.
    result = model.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["norm.weight"] and not result.unexpected_keys
    assert [m.num_slots for m in mira.memories(model)] == [3, 3] and float(model.temperature) == 2.0
    assert model.load_state_dict(extra, strict=False).unexpected_keys == ["head.extra"]
    # A module with a load hook of its own is left to torch (here one that renames an old checkpoint's key).
    model.head.register_load_state_dict_pre_hook(
        lambda module, sd, prefix, *args: sd.__setitem__(prefix + "weight", sd.pop(prefix + "w")) if prefix + "w" in sd
        else None)
    renamed = {**state, "head.w": state["head.weight"]}
    del renamed["head.weight"]
    model.load_state_dict(renamed)
    assert torch.equal(model.head.weight, state["head.weight"])


def test_a_load_begun_above_the_attached_model_is_refused_before_the_model_loads_and_says_what_had():
    # nn.Sequential(pre, model, post): torch has no hook that runs before pre loads, but the model's
    # check runs before the model loads and sees post's misfit too.
    model = filled()
    wrapper = torch.nn.Sequential(torch.nn.Linear(1, 1), model, torch.nn.Linear(2, 2))
    state = torch.nn.Sequential(torch.nn.Linear(1, 1), filled(seed=9, n=3), torch.nn.Linear(3, 2)).state_dict()
    before = whole_state(model)
    with pytest.raises(RuntimeError, match=r"size mismatch for 2\.weight.*\n.*nothing from '1' on was loaded, but "
                                           r"the call began above it and had already loaded 0\.weight, 0\.bias"):
        wrapper.load_state_dict(state)
    assert_whole_state_unchanged(model, before)


def test_copies_of_an_attached_model_refuse_for_themselves_and_detach_removes_the_check():
    import copy
    import io

    state = filled(seed=9, n=3).state_dict()
    state["head.weight"] = torch.zeros(7, state["head.weight"].shape[1])
    model = filled()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        before = whole_state(copied)
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            copied.load_state_dict(state)
        assert_whole_state_unchanged(copied, before)
    mira.detach(model)
    hooks = [h for m in model.modules() for h in m._load_state_dict_pre_hooks.values()]
    assert not [h for h in hooks if "mira" in getattr(h, "__module__", "")], hooks


# ----------------------------------------------------------------------------------------------
# write_adapters / import_peft
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, exc, msg",
    [
        (lambda: [torch.randn(24), torch.randn(23)], ValueError, "key width mismatch"),
        (lambda: [torch.randn(24), "key"], TypeError, "keys must be a Tensor"),
        (lambda: [torch.randn(24), torch.randn(2, 24)], ValueError, "got 2 keys for 1 adapters"),
        (lambda: [torch.randn(24)], ValueError, "got 1 keys for 2 memories"),
    ],
    ids=["width", "type", "count", "blocks"],
)
@pytest.mark.parametrize("capacity", [None, 4], ids=["growing", "fixed"])
def test_write_adapters_with_one_bad_key_changes_nothing(keys, exc, msg, capacity):
    model = filled(capacity=capacity)
    before = snapshot(model)
    g = torch.Generator().manual_seed(1)
    g_state = g.get_state()
    with pytest.raises(exc, match=msg):
        mira.write_adapters(model, keys(), generator=g)
    assert_unchanged(model, before)
    assert torch.equal(g.get_state(), g_state), "the generator advanced"


def test_write_adapters_into_a_memory_that_is_full_in_its_last_block_changes_nothing():
    model = filled(capacity=3)
    last = mira.memories(model)[-1]
    bank_a, bank_b = last.stored_adapters
    last.append(bank_a[:1], bank_b[:1], last.stored_keys[:1])  # the last block: 3 of 3 slots used
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="memory full"):
        mira.write_adapters(model)
    assert_unchanged(model, before)


def _peft_state(r=4, alpha=8):
    g = torch.Generator().manual_seed(5)
    state = {}
    for i in range(2):
        state[f"base_model.model.blocks.{i}.attn.qkv.lora_A.weight"] = torch.randn(r, WIDTH, generator=g) * 0.1
        b = torch.randn(3 * WIDTH, r, generator=g) * 0.1
        b[WIDTH: 2 * WIDTH] = 0
        state[f"base_model.model.blocks.{i}.attn.qkv.lora_B.weight"] = b
    return state, {"peft_type": "LORA", "r": r, "lora_alpha": alpha}


@pytest.mark.parametrize(
    "keys, exc, msg",
    [
        (lambda: [torch.randn(24), torch.randn(23)], ValueError, "key width mismatch"),
        (lambda: [torch.randn(24), torch.randn(3, 24)], ValueError, "got 3 keys for 1 adapters"),
        (lambda: [torch.randn(24), None, None], ValueError, "got 3 keys for 2 memories"),
    ],
    ids=["width", "count", "blocks"],
)
def test_import_peft_with_one_bad_key_changes_nothing(keys, exc, msg):
    model = filled()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.import_peft(model, _peft_state(), into="memory", keys=keys())
    assert_unchanged(model, before)


def test_import_peft_with_a_bad_last_block_changes_nothing():
    state, config = _peft_state()
    state["base_model.model.blocks.1.attn.qkv.lora_A.weight"] = torch.randn(4, WIDTH - 1)
    model = filled()
    before = snapshot(model)
    with pytest.raises(ValueError, match="do not fit"):
        mira.import_peft(model, (state, config))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        ({"use_rslora": "false"}, TypeError, "use_rslora .* must be true or false, got 'false'"),
        ({"lora_alpha": float("nan")}, ValueError, "lora_alpha .* must be a finite number, got nan"),
        ({"lora_alpha": float("inf")}, ValueError, "lora_alpha .* must be a finite number, got inf"),
        ({"lora_alpha": "16"}, TypeError, "lora_alpha .* must be a finite number, got '16'"),
        ({"lora_alpha": None}, TypeError, "lora_alpha .* must be a finite number, got None"),
        ({"alpha_pattern": {"qkv": float("nan")}}, ValueError, r"alpha_pattern\['qkv'\] .* must be a finite number"),
        ({"alpha_pattern": ["qkv"]}, TypeError, "alpha_pattern .* must be a mapping"),
    ],
    ids=["rslora-string", "alpha-nan", "alpha-inf", "alpha-string", "alpha-none", "pattern-nan", "pattern-list"],
)
@pytest.mark.parametrize("into", ["lora", "memory"])
def test_import_peft_refuses_config_values_it_would_misread_and_changes_nothing(change, exc, msg, into):
    # use_rslora "false" was truthy (silently scaled by alpha / sqrt(r)); a NaN alpha was reported as
    # factors "too large", a string or null one as "unsupported operand type(s) for /".
    state, config = _peft_state()
    model = filled()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.import_peft(model, (state, {**config, **change}), into=into)
    assert_unchanged(model, before)


def _with_factor(key, value):
    state, config = _peft_state()
    if key == "rank 0":  # both factors of rank 0
        key, state["base_model.model.blocks.1.attn.qkv.lora_B.weight"] = "lora_A.weight", torch.zeros(3 * WIDTH, 0)
    state[f"base_model.model.blocks.1.attn.qkv.{key}"] = value
    return state, config


@pytest.mark.parametrize(
    "key, value, exc, msg",
    [
        ("lora_A.weight", torch.randn(WIDTH), ValueError, r"lora_A has shape \(192,\); expected a 2-D"),
        ("lora_A.weight", torch.randn(4, WIDTH, 1), ValueError, r"lora_A has shape \(4, 192, 1\); expected a 2-D"),
        ("lora_B.weight", torch.randn(3 * WIDTH, 4, 1), ValueError, r"lora_B has shape \(576, 4, 1\)"),
        ("rank 0", torch.zeros(0, WIDTH), ValueError, "rank 0"),
        ("lora_A.weight", torch.randn(4, WIDTH).numpy(), TypeError, "lora_A is a ndarray, not a Tensor"),
        ("lora_A.weight", torch.randn(4, WIDTH, dtype=torch.complex64), TypeError, "lora_A has dtype torch.complex64"),
        ("lora_A.default.weight", torch.randn(4, WIDTH), ValueError, "lora_A twice"),
    ],
    ids=["A-1d", "A-3d", "B-3d", "rank-0", "numpy", "complex", "named-and-unnamed"],
)
def test_import_peft_refuses_factors_it_cannot_read_by_name_and_changes_nothing(key, value, exc, msg):
    # These raised IndexError, an expand() RuntimeError or ZeroDivisionError; a complex factor lost its
    # imaginary part and a factor saved with and without the adapter name was imported as whichever came last.
    model = filled()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.import_peft(model, _with_factor(key, value))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "files, exc, msg",
    [
        ({"adapter_model.safetensors": None}, FileNotFoundError, "adapter_config.json: no such file"),
        ({"adapter_config.json": b"{bad json"}, ValueError, "adapter_config.json is not valid JSON"),
        ({"adapter_config.json": b"[1, 2]"}, ValueError, "adapter_config.json must hold a JSON object, got list"),
        ({"adapter_model.safetensors": b"garbage123456789"}, ValueError,
         "adapter_model.safetensors: cannot read the PEFT weights"),
        ({"adapter_model.safetensors": False, "adapter_model.bin": b"garbage"}, ValueError,
         "adapter_model.bin: cannot read the PEFT weights"),
    ],
    ids=["no-config", "bad-json", "config-list", "corrupt-safetensors", "corrupt-bin"],
)
def test_import_peft_names_the_adapter_file_it_cannot_read_and_changes_nothing(files, exc, msg, tmp_path):
    # The JSON, config and weights errors named no file (JSONDecodeError, "'list' object has no attribute
    # 'get'", SafetensorError "header too large", an UnpicklingError about weights_only).
    state, config = _peft_state()
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (tmp_path / name).unlink(missing_ok=True)
        if content is None:
            (tmp_path / "adapter_config.json").unlink()
        elif content is not False:
            (tmp_path / name).write_bytes(content)
    model = filled()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.import_peft(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "module_names, alpha_pattern, exc, msg",
    [
        ({"q": "{blk}.attn.q_proj", "v": "{block}.attn.v_proj"}, {}, ValueError,
         r"module_names\['q'\] '\{blk\}.attn.q_proj' .* \{block\}"),
        ({"q": "{0}.attn.q_proj", "v": "{block}.attn.v_proj"}, {}, ValueError, r"module_names\['q'\]"),
        ({"q": 3, "v": "{block}.attn.v_proj"}, {}, TypeError, r"module_names\['q'\] must be a string, got 3"),
        (None, {"(qkv": 3}, ValueError, r"alpha_pattern key '\(qkv' is not a regular expression"),
    ],
    ids=["template-key", "template-index", "not-a-string", "bad-regex"],
)
def test_import_peft_names_a_module_name_or_pattern_it_cannot_use(module_names, alpha_pattern, exc, msg):
    # They raised KeyError('blk'), IndexError, AttributeError ("'int' object has no attribute 'format'") and
    # re.error at a position in the wrapped pattern, not the user's.
    state, config = _peft_state()
    model = filled(slices=("q", "v"))
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        mira.import_peft(model, (state, {**config, "alpha_pattern": alpha_pattern}), module_names=module_names)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "model, source, exc, msg",
    [
        ("model", _peft_state(), TypeError, "model must be an nn.Module .* got str"),
        (None, (_peft_state()[0], None), TypeError, "config must be a mapping or a PEFT config, got NoneType"),
        (None, (None, _peft_state()[1]), TypeError, "state_dict must be a mapping of tensors, got NoneType"),
    ],
    ids=["model-str", "config-none", "state-none"],
)
def test_import_peft_names_a_model_or_pair_of_the_wrong_kind(model, source, exc, msg):
    # They raised "'str' object has no attribute 'named_modules'" (after reading the whole adapter),
    # "vars() argument must have __dict__ attribute" and "'NoneType' object is not iterable".
    with pytest.raises(exc, match=msg):
        mira.import_peft(filled() if model is None else model, source)


# ----------------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------------


def backbone_snapshot(model):
    """Everything load_model may change on a backbone: its state (keys and bits), requires_grad, modes, modules."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__, m.training) for n, m in model.named_modules()])


def assert_backbone_unchanged(model, before):
    state, grads, modules = backbone_snapshot(model)
    assert sorted(state) == sorted(before[0])
    for k, v in before[0].items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), f"{k} changed"
    assert grads == before[1]
    assert modules == before[2]
    assert not mira.projections(model) and not mira.memories(model)


def _with_bare_module(tmp_path, module_name):
    """A save_model file that also lists ``module_name`` with the bare backbone's state of that module."""
    path = tmp_path / "model.safetensors"
    mira.save_model(filled(seed=11), path)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bare = dict(tiny_vit().named_modules())[module_name]
    for key, value in bare.state_dict().items():
        tensors[f"modules/{module_name}.{key}"] = value.clone()
    meta["modules"] = json.dumps(["head", module_name])
    out = tmp_path / "inside.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("module_name", ["blocks.1.attn", "blocks.1", "blocks", "blocks.1.attn.qkv"])
def test_load_model_refuses_a_module_that_attach_changes_and_leaves_the_backbone_as_it_was(tmp_path, module_name):
    # Checked against the bare backbone, such a module passed, then its load failed after attach and
    # left MIRA attached, the backbone frozen, the memories loaded (the qkv: its weight went into the
    # wrapped base layer).
    path = _with_bare_module(tmp_path, module_name)
    model = tiny_vit()
    before = backbone_snapshot(model)
    with pytest.raises(ValueError, match=rf"inside.safetensors.*'{module_name}'.*attach adapts"):
        mira.load_model(model, path)
    assert_backbone_unchanged(model, before)


def test_load_model_loads_a_module_of_a_block_that_attach_leaves_alone(tmp_path):
    # blocks=(1,): block 0 keeps its plain attention, which may be saved (trained beside MIRA) and loaded.
    source = filled(seed=11, blocks=(1,))
    with torch.no_grad():
        source.blocks[0].attn.proj.weight.add_(1.0)
    path = tmp_path / "model.safetensors"
    mira.save_model(source, path, modules=("head", "blocks.0.attn"))
    model = mira.load_model(tiny_vit(), path)
    assert torch.equal(model.blocks[0].attn.proj.weight, source.blocks[0].attn.proj.weight)
    assert len(mira.projections(model)) == 1


def test_load_model_whose_last_step_fails_detaches_and_restores_the_backbone(tmp_path):
    # The saved modules are loaded last: a failure there (here a hook of the caller's) must undo the
    # attach and every module already loaded, as a failure in the memories does.
    path = tmp_path / "model.safetensors"
    source = filled(seed=11)
    with torch.no_grad():
        source.head.weight.add_(1.0)
        source.norm.weight.add_(1.0)
    mira.save_model(source, path, modules=("head", "norm"))
    model = tiny_vit()

    def refuse(*args):
        raise RuntimeError("the caller's hook refuses")

    model.norm.register_load_state_dict_pre_hook(refuse)  # norm loads after head: head was loaded then
    before = backbone_snapshot(model)
    with pytest.raises(RuntimeError, match="the caller's hook refuses"):
        mira.load_model(model, path)
    assert_backbone_unchanged(model, before)
