"""The ablation options of the recipe (``first_block``, ``query_source``) and the weight-mass diagnostic."""

import warnings

import pytest
import torch

import mira
from mira.experiments import __main__ as cli
from mira.experiments import protocols as P
from mira.experiments.report import record_name
from mira.experiments.stages import RecipeConfig, Task, _QueryTap, attach_memory_model, train_adapter_pool

pytestmark = pytest.mark.filterwarnings("ignore:.*plain-PyTorch reference.*")

CFG = RecipeConfig(adapters_per_task=2, batch_size=8, max_epochs=1, consolidation_epochs=1)


@pytest.fixture(scope="module")
def tasks():
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(2):
        y = torch.randint(10, (24,), generator=g)
        x = (torch.rand(24, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / 20 + 0.3 * t).clamp(0, 1)
        out.append(Task(f"t{t}", x, y, x[:8], y[:8], tuple(range(10))))
    return out


@pytest.fixture(scope="module")
def pool(backbone, tasks):
    return train_adapter_pool(backbone, tasks, CFG, seed=0, local_labels=False)


def test_recipe_names_its_choices():
    with pytest.raises(ValueError, match="first_block"):
        RecipeConfig(first_block="skip")
    with pytest.raises(ValueError, match="query_source"):
        RecipeConfig(query_source="final")
    with pytest.raises(ValueError, match="routing='none'"):
        RecipeConfig(first_block="off", routing="supervised")


def test_backbone_query_is_the_frozen_backbone_feature_on_every_forward_path(backbone, tasks):
    model = attach_memory_model(backbone, rank=4, head_rows=10, cfg=CFG.replace(query_source="backbone"))
    plain = attach_memory_model(backbone, rank=4, head_rows=10, cfg=CFG)
    # The backbone stays outside the model: no extra parameters for optimisers, DualGPM or state dicts.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = tasks[1].train_x[:5] * 2 - 1
    with torch.no_grad():
        expected = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    tap = _QueryTap(model)
    try:
        for forward in (model, model.forward_features):
            tap.queries = [None] * len(tap.projs)
            with torch.no_grad():
                forward(x)
            for q in tap.queries:  # identity query module: the feature itself, in every block
                torch.testing.assert_close(q, expected)
    finally:
        tap.close()
    # The paper's query differs from block to block and is constant in block 0 (the CLS token there).
    tap = _QueryTap(plain)
    try:
        with torch.no_grad():
            plain(x)
        assert torch.allclose(tap.queries[0], tap.queries[0][:1].expand_as(tap.queries[0]))
        assert not torch.allclose(tap.queries[1], tap.queries[1][:1].expand_as(tap.queries[1]))
    finally:
        tap.close()
    # A query for a batch whose images were not captured is refused, not silently stale.
    with pytest.raises(RuntimeError, match="no images of this batch"):
        mira.memories(model)[0].make_query(torch.randn(3, 4, 16))


def test_backbone_query_feeds_a_trainable_query_module(backbone, tasks):
    model = attach_memory_model(backbone, rank=4, query="mlp", head_rows=10, cfg=CFG.replace(query_source="backbone"))
    mem = mira.memories(model)[1]
    mira.set_stage(model, "consolidation")
    inner = list(mem.query_module.inner.parameters())
    trainable = {id(p) for p in mira.trainable_parameters(model, "consolidation")}
    assert inner and all(id(p) in trainable for p in inner)  # the MLP still trains in consolidation
    model(tasks[0].train_x[:4] * 2 - 1)
    mem.make_query(torch.randn(4, 3, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in inner)


def test_first_block_off_leaves_block0_empty_for_mira_only(backbone, tasks, pool):
    cfg = P.ProtocolConfig(recipe=CFG, probe_max_iter=20)  # the probe's fit is not what this tests
    off = P.Variant("off", "mira", CFG.replace(first_block="off"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = P.run_continual("dil", off, backbone, tasks, pool, cfg, seed=0, keep_model=True)
        ctrl = P.run_continual("dil", P.Variant("u", "uniform_mean", off.recipe), backbone, tasks, pool, cfg, seed=0,
                               keep_model=True)
    assert [m.num_slots for m in mira.memories(r["model"])] == [0, 4]
    assert [m.num_slots for m in mira.memories(ctrl["model"])] == [4, 4]  # the controls use every block
    mass = P.weight_mass(r["model"], tasks)
    assert mass[0] == {"abs_sum": 0.0, "max_abs": 0.0, "domain_spread": 0.0}
    assert mass[1]["abs_sum"] > 0 and mass[1]["max_abs"] > 0
    # Uniform mixing: |w| sums to 1 in every block and no block tells the domains apart.
    for block in P.weight_mass(ctrl["model"], tasks):
        assert block["abs_sum"] == pytest.approx(1.0) and block["max_abs"] == pytest.approx(0.25)
        assert block["domain_spread"] == pytest.approx(0.0, abs=1e-6)


def test_ablation_table_rows_and_folder():
    base, improved = cli.preset("default"), cli.preset("improved")
    rows = cli.ablation_variants(base, improved, "dil")
    names = [v.name for v in rows]
    assert len(set(names)) == len(names) and cli.ablation_variants(base, improved, "dg") == []
    by_name = {v.name: v for v in rows}
    # each cause-isolating row differs from the faithful recipe in exactly the field it names
    for name, field in (("mira, block 0 off", "first_block"), ("mira, backbone query", "query_source"),
                        ("mira, patch-mean query", "query_token"), ("mira, relu", "separation")):
        diff = {k for k, v in vars(by_name[name].recipe).items() if getattr(base, k) != v}
        assert diff == {field}, name
    assert record_name("idigits", "default", "ablations") == "idigits-ablations"
    assert record_name("idigits", "paper") == "idigits-paper" and record_name("idigits", "default") == "idigits"
    with pytest.raises(SystemExit):
        cli.main(["dil", "--table", "ablations", "--variants", "no such row", "--no-progress"])


def _doc(seeds, rows):
    runs = {name: [{"seed": s, "avg_acc": 0.5 + 0.01 * s, "forgetting": 0.1, "probe": 0.4} for s in seeds]
            for name in rows}
    return {"command": "c", "suite": "idigits", "preset": "default", "table": "ablations", "mode": "full",
            "seeds": seeds, "elapsed_seconds": 1.0, "cpu_seconds": 1.0, "timings_seconds": {}, "adaptation": {},
            "machine": {"cpu": "x", "cpus": 2, "torch_threads": 1, "loadavg_start": [0.0]},
            "results": {"dil": {"runs": runs, "tasks": ["a"], "domains": ["a"]}}, "row_order": {"dil": rows},
            "variants": {"dil": [{"name": n} for n in rows]}}


def test_merge_takes_parts_with_different_rows_and_shows_short_rows_seed_count(tmp_path):
    import json

    from mira.experiments.report import merge

    parts = []
    for name, doc in (("s0", _doc([0], ["mira", "mira, relu", "improved"])),
                      ("s12", _doc([1, 2], ["mira", "improved"]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
        parts.append(str(tmp_path / name))
    merged = merge(parts, str(tmp_path / "out"), "merge")
    assert merged["seeds"] == [0, 1, 2] and merged["row_order"]["dil"] == ["mira", "mira, relu", "improved"]
    assert len(merged["results"]["dil"]["runs"]["improved"]) == 3
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mira | 51.0 ± 1.0 |" in table and "| mira, relu (1 seed) | 50.0 ± 0.0 |" in table
    with pytest.raises(ValueError, match="share seeds"):
        merge([parts[0], parts[0]], str(tmp_path / "bad"), "merge")
