"""The one training loop (sampler, step, early stop, resumable state) and the recipe presets."""

import pytest
import torch

from mira.experiments.recipe import PRESETS, RecipeConfig, preset
from mira.experiments.training import EarlyStop, EpochSampler, LoopState, StepStats, fit


def test_sampler_covers_every_index_once_per_epoch_and_reshuffles():
    s = EpochSampler(10, 3, seed=5)
    s.set_epoch(0)
    e0 = torch.cat(list(s))
    s.set_epoch(1)
    e1 = torch.cat(list(s))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(10))
    assert not torch.equal(e0, e1) and len(s) == 4
    s.set_epoch(0)
    assert torch.equal(torch.cat(list(s)), e0)  # an epoch replays from (seed, epoch) alone


def test_sampler_shards_like_a_distributed_sampler():
    shards = [EpochSampler(11, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    got = [torch.cat(list(s)) for s in shards]
    assert sorted(torch.cat(got).tolist()) == list(range(11))
    assert [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(4, 2, seed=0, rank=3, world_size=3)


def test_fit_stops_early_on_reduced_counts_and_resumes_from_its_state():
    calls = []

    def step(idx):
        calls.append(len(idx))
        epoch = (len(calls) - 1) // 3  # 3 batches per epoch; accuracy rises with the epoch
        return StepStats(1.0 * len(idx), int(len(idx) * min(1.0, 0.4 + 0.3 * epoch)), len(idx))

    state = fit(step, EpochSampler(9, 3, seed=0), epochs=10, early_stop=EarlyStop(0.99))
    assert state.stopped and state.epochs_done == 3
    assert [round(h["train_acc"], 2) for h in state.history] == [0.33, 0.67, 1.0]
    # The reduce hook sees each epoch's summed counts (a distributed run all-reduces them there).
    seen = []
    fit(lambda idx: StepStats(0.0, 0, len(idx)), EpochSampler(5, 2, seed=0), epochs=2,
        reduce=lambda s: seen.append(s.seen) or s)
    assert seen == [5, 5]
    # Resume: a state after 1 of 3 epochs runs the remaining 2.
    partial = LoopState()
    fit(lambda idx: StepStats(0.0, 0, len(idx)), EpochSampler(4, 4, seed=0), epochs=1, state=partial)
    restored = LoopState()
    restored.load_state_dict(partial.state_dict())
    n = []
    fit(lambda idx: n.append(1) or StepStats(0.0, 0, len(idx)), EpochSampler(4, 4, seed=0), epochs=3, state=restored)
    assert len(n) == 2 and restored.epochs_done == 3


def test_presets_hold_the_authors_values_and_options_are_validated():
    paper = PRESETS["paper"]
    assert (paper.batch_size, paper.lr, paper.weight_decay, paper.max_epochs, paper.adapters_per_task) == (
        128, 1e-3, 1e-3, 5, 10)
    assert (paper.head, paper.head_lr, paper.head_weight_decay, paper.key_lr) == ("fresh_bias", 1e-3, 1e-2, 1e-3)
    assert (paper.key_norm, paper.key_init, paper.gpm_keys, paper.routing, paper.adapt_head) == (
        "per_feature", "uniform", "raw", "none", "fresh")
    assert paper.gpm_threshold == 0.7 and paper.dg_key_lr_factor == 1e-3
    default = PRESETS["default"]
    assert (default.batch_size, default.lr, default.max_epochs, default.adapters_per_task) == (32, 3e-3, 4, 1)
    assert preset("paper", adapters_per_task=1).adapters_per_task == 1
    with pytest.raises(ValueError, match="routing"):
        RecipeConfig(routing="always")
    with pytest.raises(ValueError, match="adapt_head='shared'"):
        RecipeConfig(head="shared")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("authors")


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("batch_size", 0), ("batch_size", -8), ("gpm_batch", 0), ("batch_size", 2.5),
    ("lr", -1.0), ("lr", float("nan")), ("key_lr", -1.0), ("key_lr", float("nan")), ("head_lr", -1.0),
    ("head_lr", 0.0), ("dg_key_lr_factor", float("inf")), ("weight_decay", -1.0),
    ("head_weight_decay", -5.0), ("routing_weight", float("nan")), ("mixup_alpha", 0.0),
    ("early_stop_acc", float("nan")),
])
def test_a_recipe_refuses_values_that_train_wrong_or_fail_late(field, value):
    # Each was accepted: batch_size 0 and rank 0 failed in the adaptation stage, gpm_batch 0 ran with
    # DualGPM's bases left empty, negative head / key rates and decays trained by gradient ascent, a NaN
    # rate failed as "the forward overflows", mixup_alpha 0 in DG's Beta sampler, a NaN early stop never stopped.
    with pytest.raises(ValueError, match=field):
        RecipeConfig(**{field: value})


def test_a_recipe_keeps_the_values_that_mean_off():
    # zero decay and zero routing weight are "none"; an early stop at 1 or above never stops
    RecipeConfig(weight_decay=0.0, head_weight_decay=0.0, routing_weight=0.0, early_stop_acc=1.0)
    RecipeConfig(early_stop_acc=float("inf"), consolidation_epochs=0)
