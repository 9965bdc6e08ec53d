"""Smoke tests of the latency benchmark's harness (benchmarks/latency.py) on toy inputs.

Timing itself is not tested here (a test cannot assert a machine's speed); what is: the stopping
rules and statistics of the interleaved rounds (with a scripted timer), the arithmetic floor
against a hand count, the eager baseline against the reference, and one whole run on a tiny ViT
writing its records, table and plots.
"""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from benchmarks import _pairs, in_situ, latency  # noqa: E402
from benchmarks.eager_mira import EagerMiraLinear  # noqa: E402
from mira_kernels import reference  # noqa: E402


def _scripted_timer(fn):
    # The "variants" below return their own duration: the harness logic runs without a clock.
    return fn()


def test_interleave_recovers_a_known_ratio_and_stops_on_width_in_percentage_points():
    noise = itertools.cycle([0.97, 1.0, 1.03, 0.99, 1.01])
    variants = {"base": lambda: 1.0, "slow": lambda: 1.10 * next(noise)}
    rounds = latency.interleave(variants, _scripted_timer, watch=("slow", "base"), budget=60.0, width=8.0,
                                min_rounds=10, warmup=1, seed=0)
    r = rounds.ratio("slow", "base")
    assert rounds.stopped_by == "target_width" and rounds.rounds == 10
    assert r["lo"] <= r["ratio"] <= r["hi"]
    assert abs(r["ratio"] - 1.10) < 0.02 and 1.05 < r["lo"] and r["hi"] < 1.15
    assert latency.median_of(rounds, "base")["median_s"] == 1.0


def test_interleave_stops_on_budget_when_the_interval_stays_wide():
    noise = itertools.cycle([0.5, 1.5, 0.7, 1.3])
    variants = {"base": lambda: 1.0, "noisy": lambda: next(noise)}
    rounds = latency.interleave(variants, _scripted_timer, watch=("noisy", "base"), budget=0.0, width=0.1,
                                min_rounds=6, warmup=0, seed=0)
    assert rounds.stopped_by == "budget" and rounds.rounds == 6


def test_rounds_run_with_the_garbage_collector_paused_and_restore_it():
    import gc

    seen = []
    variants = {"a": lambda: seen.append(gc.isenabled()) or 1.0, "b": lambda: 1.0}
    assert gc.isenabled()
    _pairs.time_interleaved(variants, timer=_scripted_timer, target_width=None, budget_s=60.0, min_rounds=5,
                            max_rounds=5, warmup=0)
    assert seen == [False] * 5 and gc.isenabled()


def test_median_interval_is_the_binomial_pair_of_order_statistics():
    # Distribution-free: the interval's ends are sample values whose binomial coverage of the median
    # is >= 95% at every size (the bootstrap it replaces covered 0.74 at 3 values); too few values
    # for 95% give an unbounded interval, never a narrow one.
    import math

    from scipy import stats

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0, 12.0, 11.0, 13.0]
    med, lo, hi = _pairs.median_ci(values)
    ordered = sorted(values)
    assert med == 7.0 and (lo, hi) == (ordered[2], ordered[-3])  # 3rd and 11th of 13
    coverage = stats.binom.cdf(10, 13, 0.5) - stats.binom.cdf(2, 13, 0.5)
    assert 0.95 <= coverage < stats.binom.cdf(11, 13, 0.5) - stats.binom.cdf(1, 13, 0.5)
    assert _pairs.median_ci(values[:6])[1:] == (1.0, 9.0)  # 6 values: the range is the 95% interval
    assert _pairs.median_ci(values[:5])[1:] == (-math.inf, math.inf)
    assert _pairs.median_ci([2.0] * 4) == (2.0, 2.0, 2.0)
    assert _pairs.ratio_stats([1.0] * 3, [2.0, 1.0, 4.0])["width"] == math.inf


def test_extra_time_and_overhead_arithmetic():
    rounds = _pairs.PairResult(["op", "base"], {"op": [1.02] * 9, "base": [1.0] * 9}, 1.0, "target_width")
    extra = latency._extra(rounds, "op", "base")
    assert extra["extra_s"] == pytest.approx(0.02) and extra["extra_lo_s"] == pytest.approx(0.02)
    block = {"op": extra, "op_vs_empty": extra, "query": {"median_s": 0.001, "lo_s": 0.001, "hi_s": 0.001}}
    # 12 blocks x (20 ms op + 1 ms query) over a 10 s backbone = 2.52%; the adapter alone 2.4%.
    overhead = latency.overhead_percent(block, 12, 10.0)
    assert overhead["decomposed"]["percent"] == pytest.approx(2.52)
    assert overhead["adapter_only"]["percent"] == pytest.approx(2.4)


def test_floor_of_the_published_configuration():
    # ViT-B/16 at 224 px: 197 tokens, width 768; hand count of the backbone: 17.56 GMACs per image.
    per_block = latency.mira_extra_macs(tokens=197, d_in=768, d_s=768, d_k=768, slices=2, rank=4, slots=30)
    assert per_block == 197 * 2 * 4 * 1536 + 30 * 2 * 4 * 1536 + 2 * 30 * 768 + 768
    linears = 768 * (3 * 768) + 768 * 768 + 2 * 768 * 3072
    backbone = 196 * 3 * 256 * 768 + 12 * (197 * linears + 2 * 197 * 197 * 768) + 768 * 1000
    assert 100 * 12 * per_block / backbone == pytest.approx(0.19, abs=0.005)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)


def test_backbone_macs_matches_a_hand_count():
    model = _tiny_vit().eval()
    t, d = 5, 16  # 4 patches + CLS
    per_block = t * (d * 3 * d + d * d + 2 * d * 4 * d) + 2 * t * t * d
    expected = 4 * (3 * 8 * 8) * d + 2 * per_block + d * 3
    assert latency.backbone_macs(model) == expected


@pytest.mark.parametrize("slots", [1, 5])
def test_eager_baseline_equals_the_reference(slots):
    g = torch.Generator().manual_seed(slots)
    d, r = 8, 2
    base = nn.Linear(d, 3 * d).double()
    keys = torch.randn(slots, d, generator=g, dtype=torch.float64)
    bank_a = torch.randn(slots, 2, r, d, generator=g, dtype=torch.float64)
    bank_b = torch.randn(slots, 2, d, r, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    eager = EagerMiraLinear(base, keys, bank_a, bank_b, [0, 2 * d], scale=0.5)
    with torch.no_grad():
        want = reference.mira_linear(x, base.weight, base.bias, x[:, 0], keys, bank_a, bank_b,
                                     slice_offsets=[0, 2 * d], scale=0.5)
        torch.testing.assert_close(eager(x), want)


def _tiny_config(tmp_path, **kw) -> latency.BenchConfig:
    settings = {"model": "tiny", "batch_sizes": (2,), "slots": 4, "e2e_budget": (0.05,), "module_budget": 0.05,
                "min_module_pairs": 5, "min_e2e_rounds": 3, "op_budget": 0.05, "parts_budget": 0.05,
                "in_situ_budget": 0.05,
                "results_dir": str(tmp_path)}
    return latency.BenchConfig(**{**settings, **kw})


def test_a_whole_run_leads_with_what_a_user_pays(tmp_path):
    cfg = _tiny_config(tmp_path, baselines=True, sweep_slots=(2,), sweep_batch=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy shapes: a second thread only adds barrier stalls on a busy machine
    try:
        record = latency.run(cfg, model=_tiny_vit())
    finally:
        torch.set_num_threads(threads)
    table = latency.format_table(record)
    paths = latency.write_record(record, tmp_path, table)

    assert record["checks"]["fused_vs_reference"] <= record["checks"]["tolerance"]
    res = record["results"][0]
    for key in ("module", "end_to_end_headline"):
        d = res[key]
        assert d["lo"] <= d["percent"] <= d["hi"]
    assert res["module"]["pairs"] >= 20 and res["end_to_end_headline"]["rounds"] >= 3
    assert set(res["end_to_end"]["variants"]) >= {"backbone", "fused", "reference", "eager"}
    assert res["floor"]["bound"] in ("memory", "compute") and res["floor"]["percent"] > 0
    f = res["floor"]  # the no-overlap floor is the two terms' sum: above the max, at most twice it
    assert f["serial_s"] == f["compute_s"] + f["memory_s"] and f["percent"] < f["serial_percent"] <= 2 * f["percent"]
    assert f"(without overlap, the sum: {f['serial_percent']:.3f}%)" in table
    # The floor's bandwidth is the module pairs' own eviction reads; the start-of-run one beside it.
    assert res["floor"]["bandwidth_source"] == "the eviction reads of the timed rounds"
    assert res["floor"]["dram_bytes_per_s_at_start"] > 0
    # enough pairs for the tiny minimums: a verdict, whichever
    assert {v["status"] for v in res["verdicts"]} <= {"met", "not met", "inconclusive"}
    assert set(res["budget"]["parts"]) >= {"python_layer", "retrieval", "mixing", "shrink_expand"}
    # In place: the run's own models, every block's qkv timed inside forwards, and left unwrapped after.
    in_place = res["in_place"]["over_backbone_percent"]["qkv calls, in place"]
    assert in_place["lo"] <= in_place["median"] <= in_place["hi"] and res["in_place"]["rounds"] >= 3
    # The table leads with the headline and stamps commit, date, CPU and ISA.
    lines = table.splitlines()
    assert lines[1].startswith("commit ") and record["machine"]["cpu"] in lines[1]
    assert lines.index(next(x for x in lines if x.startswith("What a user of mira.attach pays"))) < \
        lines.index("Diagnostics")
    assert "decomposed (op level" in table and "in place, B=2" in table
    assert "outside its kernel's phases" in table  # the in-place call path, beside the in-place figure
    assert json.loads(paths["jsonl"].read_text().splitlines()[-1])["config"]["slots"] == 4
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {"module", "end_to_end_headline", "e2e:fused", "decomposed:decomposed", "floor",
            "sweep:decomposed"} <= {row["measure"] for row in rows}

    from benchmarks import plots

    written = plots.write_plots(tmp_path)
    assert {p.name for p in written} == {"latency_overhead_vs_batch.png", "latency_overhead_vs_slots.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_cold_cache_reads_give_the_bandwidth_of_the_timed_rounds(monkeypatch):
    from benchmarks import budget

    monkeypatch.setattr(budget, "last_level_cache_bytes", lambda: 1 << 20)
    cache = budget.ColdCache(lambda: torch.ones(3))
    assert cache.read_bandwidth() is None  # no reads yet
    times = [cache.timer(lambda: None) for _ in range(5)]
    assert len(times) == 5 and len(cache.read_seconds) == 5
    bw = cache.read_bandwidth()
    assert bw["buffer_bytes"] == 2 << 20 and bw["reads"] == 5
    assert bw["lo"] <= bw["bytes_per_s"] <= bw["hi"]
    assert budget.ColdCache(lambda: torch.ones(3), evict=False).read_bandwidth() is None
    # The start-of-run read is of at least four times the last-level cache.
    assert budget.dram_read_bandwidth(mib=1, repeats=3)["buffer_bytes"] == 4 << 20


def _headline(module: tuple[float, float, float], pairs: int, end: tuple[float, float, float]) -> dict:
    """A B=1 result as latency.verdicts reads it: module (percent, lo, hi) over that many pairs,
    end to end (percent, lo, hi) over 40 rounds containing the module figure; floor 0.2%."""
    return {"batch": 1, "floor": {"percent": 0.2},
            "module": dict(zip(("percent", "lo", "hi"), module), pairs=pairs),
            "end_to_end_headline": dict(zip(("percent", "lo", "hi"), end), width=end[2] - end[1], rounds=40,
                                        contains_module=True)}


def test_no_verdict_from_too_few_pairs(tmp_path):
    res = _headline((0.1, 0.0, 0.2), 50, (0.1, -0.3, 0.5))
    cfg = _tiny_config(tmp_path, min_module_pairs=100, min_e2e_rounds=30)
    assert {v["status"] for v in latency.verdicts(res, cfg)} == {"no verdict", "met"}  # width check needs rounds only
    res["module"]["pairs"] = 100
    assert [v["status"] for v in latency.verdicts(res, cfg)] == ["met", "met", "met"]
    res["end_to_end_headline"]["rounds"] = 29
    assert [v["status"] for v in latency.verdicts(res, cfg)] == ["met", "no verdict", "no verdict"]


def test_the_module_verdict_reads_the_whole_interval(tmp_path):
    # From the median alone +0.396% [0.363, 0.421] against 0.40% read "met", and 0.01 pp of drift
    # "not met": an interval that straddles the target is inconclusive.
    res = _headline((0.396, 0.363, 0.421), 1000, (0.4, -0.1, 0.8))
    cfg = _tiny_config(tmp_path, min_module_pairs=100, min_e2e_rounds=30)
    first = latency.verdicts(res, cfg)[0]
    assert first["status"] == "inconclusive" and "straddles" in first["detail"]
    res["module"].update(lo=0.35, hi=0.399)
    assert latency.verdicts(res, cfg)[0]["status"] == "met"
    res["module"].update(lo=0.401, hi=0.45)
    assert latency.verdicts(res, cfg)[0]["status"] == "not met"
    assert latency.target_for(1, float("nan"))["rule"] == "the paper's 0.40% (no floor measured)"


def test_targets():
    assert latency.target_for(1, 0.2)["percent"] == pytest.approx(0.40)  # the paper's figure applies
    assert latency.target_for(1, 0.35)["percent"] == pytest.approx(0.45)  # floor + 0.10 pp
    assert latency.target_for(8, 0.35)["percent"] == pytest.approx(0.25)


def test_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        latency.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    import dataclasses

    for f in dataclasses.fields(latency.BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out or "--no-" + f.name.replace("_", "-") in out, flag
    assert "--dtype {float32,float64,bfloat16,float16}" in out and "(default: float32)" in out
    assert "(default: 1 8)" in out and "(default: vit_base_patch16_224)" in out
    cfg = latency.parse_args(["--batch-sizes", "1", "2", "--dtype", "bfloat16", "--no-plots"])
    assert cfg.batch_sizes == (1, 2) and cfg.dtype == "bfloat16" and not cfg.plots
    with pytest.raises(SystemExit):
        latency.parse_args(["--quick", "--record"])  # quick runs are never recorded


def test_runs_write_to_the_scratch_folder_and_change_no_tracked_file(monkeypatch):
    import subprocess

    root = latency.RESULTS_DIR.parent.parent

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                              text=True, check=True).stdout

    if subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert latency.BenchConfig().out_dir() == latency.SCRATCH_DIR
    assert latency.BenchConfig(record=True).out_dir() == latency.RESULTS_DIR
    monkeypatch.setattr(latency, "create_model", lambda name: _tiny_vit())
    before = status()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for extra in (["--quick"], []):  # what `make bench` runs, quick and not
            argv = ["--model", "tiny", "--batch-sizes", "2", "--slots", "4", "--e2e-budget", "0.05",
                    "--module-budget", "0.05", "--op-budget", "0.05", "--parts-budget", "0.05",
                    "--in-situ-budget", "0.05", *extra]
            assert latency.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert status() == before  # .bench/ is ignored; benchmarks/results/ untouched
    assert (latency.SCRATCH_DIR / "latency.jsonl").exists()


def test_sweep_summary_reads_a_pytest_benchmark_json(tmp_path):
    from benchmarks import plots

    def bench(impl, median, peak):
        info = {"impl": impl, "batch": 8, "rank": 4, "slots": 30, "dtype": "float32", "images_per_s": 8 / median,
                "peak_memory_bytes": peak}
        return {"group": "B8-r4-N30-fp32", "extra_info": info, "stats": {"median": median}}

    data = {"datetime": "now", "commit_info": {"id": "abc"}, "machine_info": {},
            "benchmarks": [bench("linear", 0.020, 14 * 2**20), bench("fused", 0.0202, None)]}
    path = tmp_path / "sweep_ops.json"
    path.write_text(json.dumps(data))
    table = plots.sweep_summary(path)
    assert "| B8-r4-N30-fp32 | 20.00, 1.000, 400.0, 14.0 | 20.20, 1.010, 396.0, n/a | - | - |" in table


def test_e2e_interval_study_recovers_a_known_overhead(tmp_path, capsys):
    from benchmarks import e2e_interval

    rng = np.random.default_rng(0)
    backbone = 0.25 * np.exp(rng.normal(0, 0.05, 300))  # round-to-round drift, shared by the pair
    fused = backbone * 1.02 * np.exp(rng.normal(0, 0.01, 300))
    rec = {"commit": "x", "machine": {"cpu": "test"},
           "results": [{"batch": 1, "end_to_end": {"seconds": 150.0, "times_s": {"fused": fused.tolist(),
                                                                               "backbone": backbone.tolist()}}}]}
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    for name, est in e2e_interval.ESTIMATORS.items():
        mid, lo, hi = e2e_interval.interval(est, fused, backbone, n_boot=200)
        assert lo <= mid <= hi and lo < 2.0 < hi + 0.3, name
    assert e2e_interval.main([str(path), "--target", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "median of ratios" in out and "0.5 pp: ~" in out


def test_in_situ_times_every_block_and_splits_the_op_by_phase():
    record = in_situ.measure(batch=2, rounds=6, model=_tiny_vit())
    assert record["blocks"] == 2 and record["rounds"] == 6
    assert set(record["over_backbone_percent"]) == {"whole forward", "qkv calls, in place", "everything else",
                                                    "empty-memory op's qkv calls", "empty-memory op's forward",
                                                    "empty-memory op's everything else",
                                                    "everything else, MIRA over empty-memory op"}
    for iv in record["over_backbone_percent"].values():
        assert iv["lo"] <= iv["median"] <= iv["hi"]
    assert all(v > 0 for v in record["qkv_ms_per_forward"].values())
    # MIRA's op scores and mixes, the empty-memory op does neither (the CPU backend's phase clock).
    phases = record["phases_us_per_call"]
    assert phases["fused"]["retrieval"] > 0 and phases["fused"]["mixing"] > 0
    assert phases["empty"]["retrieval"] == 0 and phases["empty"]["mixing"] == 0
    assert set(record["phase_difference_us_per_call"]) == set(in_situ.PHASES)
    # The call path around the kernel: positive (a Python call and a binding take time) and below the
    # call itself (6 rounds give the widest finite interval).
    for name in ("fused", "empty"):
        iv = record["outside_phases_us_per_call"][name]
        per_call_us = 1e3 * record["qkv_ms_per_forward"][name] / record["blocks"]
        assert iv["lo"] <= iv["median"] <= iv["hi"] and 0 < iv["median"] < per_call_us
    with pytest.raises(ValueError, match="at least 6"):  # 3-5 rounds printed [-inf, +inf] as an interval
        in_situ.measure(rounds=5, model=_tiny_vit())


def test_in_situ_on_a_runs_models_leaves_them_as_they_were():
    cfg = latency.BenchConfig(model="tiny", slots=4)
    variants = latency.build_variants(cfg, model=_tiny_vit())
    own = [(b.attn, b.attn.qkv) for m in (variants.backbone, variants.mira) for b in m.blocks]
    record = in_situ.measure(2, variants=variants, budget_s=0.01)
    assert record["rounds"] >= in_situ.MIN_ROUNDS  # the budget's minimum
    assert set(record["qkv_ms_per_forward"]) == {"backbone", "fused"}  # that run built no empty-memory op
    assert all(attn.qkv is qkv for attn, qkv in own)


def test_in_situ_layers_times_the_other_layers_and_puts_the_model_back():
    model = _tiny_vit()
    record = in_situ.measure(batch=1, rounds=6, model=model, layers=True)
    rows = record["layers_fused_over_empty_us_per_block"]
    assert {"norm1", "attn.proj", "attn, between qkv and proj", "norm2", "mlp.fc1", "mlp.fc2"} <= set(rows)
    for iv in rows.values():
        assert iv["lo"] <= iv["median"] <= iv["hi"]
    # Every wrapper is gone afterwards: the model's layers are its own modules again.
    assert not any(isinstance(m, in_situ._TimedCall) for m in model.modules())
    text = in_situ.report(record, _pairs.machine_info(), "commit", "time")
    assert "the other layers, MIRA model over the empty-memory op's" in text and "mlp.fc1" in text
