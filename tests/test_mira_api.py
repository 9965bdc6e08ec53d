"""The PEFT-shaped API: attach(model, MiraConfig), the parameter summary, and the stale-optimiser-state error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mira
from tests import tiny_models
from tests.tiny_models import tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")


def images(batch=2, seed=1):
    return tiny_models.images(batch, seed)


def test_attach_takes_a_config_positionally_or_by_keyword_and_keywords_still_work():
    config = mira.MiraConfig(rank=2, query="linear", key_dim=16, capacity=4, blocks=(1,))
    snapshot = dataclasses.asdict(config)
    by_config = mira.attach(tiny_vit(), config)
    by_keyword = mira.attach(tiny_vit(), config=config)
    by_options = mira.attach(tiny_vit(), rank=2, query="linear", key_dim=16, capacity=4, blocks=(1,))
    assert dataclasses.asdict(config) == snapshot  # not modified
    for model in (by_config, by_keyword, by_options):
        (memory,) = mira.memories(model)
        assert [n for n, _ in mira.named_memories(model)] == ["blocks.1.mira_memory"]
        assert (memory.config.rank, memory.config.d_k, memory.capacity) == (2, 16, 4)
    assert mira.memories(mira.attach(tiny_vit(), eps=None))[0].config.eps == mira.MiraConfig().eps  # as before
    assert mira.memories(mira.attach(tiny_vit()))[0].config == mira.memories(mira.attach(tiny_vit(), mira.MiraConfig())
                                                                              )[0].config


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((mira.MiraConfig(),), {"rank": 8}, "not both"),
        (({"rank": 8},), {}, "config must be a mira.MiraConfig"),
        ((), {"ranks": 8}, r"unexpected keyword arguments \['ranks'\]"),
    ],
)
def test_attach_config_errors(args, kwargs, message):
    model = tiny_vit()
    with pytest.raises(TypeError, match=message):
        mira.attach(model, *args, **kwargs)
    assert not mira.projections(model)


def test_parameter_summary_has_totals_percentages_and_the_banks(capsys):
    model = mira.attach(tiny_vit(), capacity=30)
    mira.set_stage(model, "consolidation", extra_trainable=("head",))
    counts = mira.count_parameters(model)
    mira.print_trainable_parameters(model)
    text = capsys.readouterr().out
    assert text == mira.parameter_summary(model) + "\n"
    lines = text.splitlines()
    assert lines[0].startswith("MIRA on VisionTransformer: 2 adapted blocks, 0 stored adapters per block, "
                               "stage consolidation")
    row = {line[:28].strip(): line[28:].split() for line in lines[2:8]}
    assert row["stored adapters (bank)"] == [f"{counts['bank']:,d}", f"{100 * counts['bank'] / counts['backbone']:.4f}"]
    assert row["added by MIRA (served)"][0] == f"{counts['keys'] + counts['bank']:,d}"
    trainable = counts["keys"] + sum(p.numel() for p in model.head.parameters())
    assert counts["trainable"] == trainable
    assert lines[-1] == (f"trainable params: {trainable:,d} || all params: {counts['total']:,d} || "
                         f"trainable%: {100 * trainable / counts['total']:.4f}")
    assert "no MIRA layers" in mira.parameter_summary(tiny_vit())


def store_random_adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mira.projections(model):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
    mira.write_adapters(model, generator=g)


@pytest.mark.parametrize("capacity", [4, None])
def test_a_step_with_moments_of_slots_that_moved_raises_and_names_the_cure(capacity):
    # remove compacts the slots: each slot's moments would then update another slot. In a fixed-capacity
    # memory (and a growing one back at its old size) no shape changes, and the step used to run.
    model = mira.attach(tiny_vit(), capacity=capacity)
    for seed in range(3):
        store_random_adapter(model, seed)
    mira.set_stage(model, "consolidation")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(images()).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    for memory in mira.memories(model):
        memory.remove([0])
    if capacity is None:
        store_random_adapter(model, 7)  # back to three slots: the shapes the moments have
    model(images()).sum().backward()
    keys = [m.keys.detach().clone() for m in mira.memories(model)]
    with pytest.raises(RuntimeError, match=r"slots have moved.*mira.forget_optimizer_state\(model, optimizer\)"):
        optimizer.step()
    assert all(torch.equal(k, m.keys) for k, m in zip(keys, mira.memories(model)))  # nothing was updated
    for fresh in (torch.optim.AdamW(params, lr=1e-2), torch.optim.Adagrad(params, lr=1e-2)):
        fresh.step()  # made after the move: its state is new (Adagrad's, made at construction, too)
        fresh.step()
    mira.forget_optimizer_state(model, optimizer)
    optimizer.step()
    optimizer.step()  # its new moments belong to the slots as they are now
    assert not any(torch.equal(k, m.keys) for k, m in zip(keys, mira.memories(model)))
    for memory in mira.memories(model):
        memory.remove([0])
    with pytest.raises(RuntimeError, match=r"forget_optimizer_state"):  # every move again (a growing one: shrank)
        optimizer.step()


def test_a_step_with_stale_optimizer_state_after_growth_raises_and_names_the_cure():
    model = mira.attach(tiny_vit())
    store_random_adapter(model, 0)
    mira.set_stage(model, "consolidation")
    params = [p for p in model.parameters() if p.requires_grad]
    for optimizer in (torch.optim.AdamW(params, lr=1e-2), torch.optim.SGD(params, lr=1e-2, momentum=0.9),
                      torch.optim.Adafactor(params, lr=1e-2)):  # Adafactor: factored row / column state
        model(images()).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        store_random_adapter(model, len(optimizer.state))  # the keys grow from N to N + 1 slots
        model(images()).sum().backward()
        keys = [m.keys.detach().clone() for m in mira.memories(model)]
        with pytest.raises(RuntimeError, match=r"mira.forget_optimizer_state\(model, optimizer\)"):
            optimizer.step()
        assert all(torch.equal(k, m.keys) for k, m in zip(keys, mira.memories(model)))  # nothing was updated
        mira.forget_optimizer_state(model, optimizer)
        optimizer.step()
        assert not any(torch.equal(k, m.keys) for k, m in zip(keys, mira.memories(model)))
        optimizer.zero_grad()
    # Adafactor's factored state of the current shape is not mistaken for stale state.
    adafactor = torch.optim.Adafactor(params, lr=1e-2)
    model(images()).sum().backward()
    adafactor.step()


def test_a_model_attached_under_inference_mode_trains_and_writes_adapters_outside_it():
    # attach under torch.inference_mode made the LoRAs inference tensors: write_adapters then
    # appended to the first memory and failed resetting its LoRA (a failed call that changed the
    # model), and set_stage could not make them trainable.
    model = tiny_vit()
    with torch.inference_mode():
        mira.attach(model)
    projections = mira.projections(model)
    assert not any(t.is_inference() for p in projections for t in (p.lora_a, p.lora_b, p.memory.keys))
    assert mira.write_adapters(model) == [0, 0]
    mira.set_stage(model, "consolidation")
    model(images()).sum().backward()
    assert all(m.keys.grad is not None for m in mira.memories(model))


def test_write_adapters_draws_the_fresh_loras_before_it_stores_anything():
    model = mira.attach(tiny_vit())
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        mira.write_adapters(model, generator=5)
    # A LoRA that cannot be reset (an inference tensor outside inference mode) fails before any append.
    with torch.inference_mode():
        frozen = torch.zeros_like(mira.projections(model)[1].lora_a)
    mira.projections(model)[1].lora_a.data = frozen
    with pytest.raises(RuntimeError, match="made under torch.inference_mode and cannot be reset outside it"):
        mira.write_adapters(model, generator=g)
    assert [m.num_slots for m in mira.memories(model)] == [0, 0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if "1.attn.qkv.lora_a" not in k)
    # The draws are reset_lora's: keys first, then each block's A, in block order.
    mira.projections(model)[1].lora_a.data = state["blocks.1.attn.qkv.lora_a"].clone()
    mira.write_adapters(model, generator=torch.Generator().manual_seed(1))
    replay = mira.attach(tiny_vit())
    g = torch.Generator().manual_seed(1)
    for m in mira.memories(replay):
        m._new_keys(None, 1, g)
    for p in mira.projections(replay):
        p.reset_lora(g)
    assert all(torch.equal(a.lora_a, b.lora_a) for a, b in zip(mira.projections(model), mira.projections(replay)))


def test_slot_and_name_arguments_of_the_wrong_kind_are_named_and_change_nothing():
    # Each of these raised "'int' object is not iterable" or the like, or (a byte mask) silently
    # removed slots 0 and 1 by reading the mask's values as indices.
    import numpy as np

    model = mira.attach(tiny_vit())
    mira.write_adapters(model, generator=torch.Generator().manual_seed(0))
    mira.write_adapters(model, generator=torch.Generator().manual_seed(1))
    memory = mira.memories(model)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = [
        (lambda: memory.remove(torch.tensor([1, 0], dtype=torch.uint8)), TypeError, "got a uint8 tensor"),
        (lambda: memory.remove(1.0), TypeError, "by int index or by name, got 1.0"),
        (lambda: mira.write_adapters(model, task=5), TypeError, "slot names .task. must be None, a str or a list"),
        (lambda: mira.write_adapters(model, task=b"x"), TypeError, "got bytes"),
        (lambda: memory.append(*memory.stored_adapters, names=5), TypeError, "got int 5"),
        (lambda: mira.write_adapters(model, torch.Generator()), TypeError, "keys got a torch.Generator; pass it as"),
        (lambda: mira.write_adapters(model, 5), TypeError, "keys must be None, a Tensor or a sequence"),
    ]
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    memory.remove(np.int64(1))  # a numpy index (an argmax, say) names one slot
    assert memory.num_slots == 1
    with pytest.raises(RuntimeError, match="no MIRA layers"):
        mira.association_matrices(tiny_vit(), images())


def test_an_attach_whose_dry_run_fails_leaves_every_requires_grad_as_it_was():
    # Each wrapped qkv was frozen on wrapping, and the failure path restored the modules but not the
    # flags (recorded only after a successful install): a fine-tuning run then silently stopped
    # training qkv.
    import mira_kernels

    model = tiny_vit()
    model.blocks[0].attn.qkv.bias.requires_grad_(False)  # a user's own choice, kept too
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    bad = torch.full((2, 3, tiny_models.IMG, tiny_models.IMG), float("nan"))
    with mira_kernels.check_finite(), pytest.raises(RuntimeError, match="dry run of the model with MIRA installed"):
        mira.attach(model, example_input=bad)
    assert not mira.projections(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_blocks_take_any_integer_index_and_refuse_flags_and_fractions_by_name():
    import numpy as np

    for blocks, expected in ((np.int64(1), (1,)), (torch.tensor(1), (1,)), (torch.tensor([0, 1]), (0, 1)),
                             (np.array([1]), (1,)), (range(2), (0, 1))):
        assert mira.MiraConfig(blocks=blocks).blocks == expected
    for blocks in ([True], np.array([True, False]), torch.tensor([True]), [0.5], torch.tensor(1.5), "0"):
        with pytest.raises(TypeError, match="blocks must be block indices"):
            mira.MiraConfig(blocks=blocks)


def test_a_memory_or_lora_too_large_to_allocate_names_the_option():
    # The allocator's own error ("DefaultCPUAllocator: can't allocate memory: you tried to allocate
    # 768000000000 bytes", "Storage size calculation overflowed") named neither capacity nor rank.
    model = tiny_vit()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for options, message in (({"capacity": 2**62}, r"capacity=4611686018427387904, rank=4.*lower capacity"),
                             ({"rank": 2**62}, r"rank=4611686018427387904, key_dim=192.*lower capacity, rank")):
        with pytest.raises(MemoryError, match=message):
            mira.attach(model, **options)
        assert not mira.projections(model) and not mira.memories(model)
        assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def qkv_state(model):
    return [p.base_layer.weight for p in mira.projections(model)]


@torch.no_grad()
def test_fold_weights_that_are_not_real_numbers_are_refused_naming_the_memory():
    # Flags folded as weights 1 and 0, complex weights lost their imaginary part (with a warning), and
    # str raised "new(): invalid data type 'str'".
    import numpy as np

    model = tiny_models.filled_vit()
    name = mira.named_memories(model)[0][0]
    weights = [w.clone() for w in qkv_state(model)]
    names = [n for n, _ in mira.named_memories(model)]
    for bad, of in ((torch.tensor([True, False]), name), (torch.tensor([1 + 5j, 0j]), name),
                    (np.array([True, False]), "every memory"), (np.array([0.5 + 1j, 0.5]), "every memory")):
        with pytest.raises(TypeError, match=rf"fold: the slot weights of {of} must be real numbers .*got dtype"):
            mira.fold(model, bad)
    for bad in ({n: "ab" for n in names}, ["ab", "cd"], [[True, False], [0.5, 0.5]]):
        with pytest.raises(TypeError, match=rf"fold: the slot weights of {name} must be real numbers, got"):
            mira.fold(model, bad)
    assert all(torch.equal(a, b) for a, b in zip(weights, qkv_state(model)))
    assert not any(p.merged_update for p in mira.projections(model))
    mira.fold(model, torch.tensor([1, 0]))  # integers are numbers
    mira.unfold(model)


def test_arguments_that_are_not_iterable_are_named():
    # "'NoneType' object is not iterable" named neither the argument nor what it takes.
    model = tiny_models.filled_vit()
    with pytest.raises(TypeError, match="mean_retrieval_weights: batches must be an iterable of input batches"):
        mira.mean_retrieval_weights(model, None, progress=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for bad in (None, 3):
        with pytest.raises(TypeError, match=rf"set_stage: extra_trainable takes a sequence of module names.*got "
                                            rf"{type(bad).__name__} {bad}"):
            mira.set_stage(model, "consolidation", extra_trainable=bad)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [p.stage for p in mira.projections(model)] == ["adaptation"] * 2


def test_query_modules_refuse_what_they_would_ignore_as_build_query_module_does():
    # build_query_module('linear', 4, 4, 8) refused the hidden width; the classes themselves took it,
    # and an unknown keyword argument, silently.
    message = "hidden_features=8 sets the hidden width of the 'mlp' query module; {!r} has no hidden layer"
    for kind, cls in (("identity", mira.IdentityQuery), ("linear", mira.LinearQuery)):
        for make, args, kwargs in ((cls, (4, 4, 8), {}), (cls, (4, 4), {"hidden_features": 8}),
                                   (mira.build_query_module, (kind, 4, 4, 8), {})):
            with pytest.raises(ValueError, match=message.format(kind)):
                make(*args, **kwargs)
    for kind in ("identity", "linear", "mlp"):
        with pytest.raises(TypeError, match=rf"the '{kind}' query module got unexpected keyword arguments \['bogus'\]"):
            mira.build_query_module(kind, 4, 4, bogus=1)
    assert isinstance(mira.build_query_module("identity", 4, 4, device="cpu", dtype=torch.float64), mira.IdentityQuery)
    assert mira.build_query_module("mlp", 4, 4, 8, dtype=torch.float64).fc1.weight.dtype == torch.float64
