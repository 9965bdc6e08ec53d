"""Merging runs of single seeds and the tables made from them (no training: hand-written results)."""

import json

from mira.experiments import report


def _doc(seeds, dil, dg, variants, **extra):
    """A results.json as python -m mira.experiments writes it (the fields merge and write read)."""
    doc = {"command": f"python -m mira.experiments all --seeds {' '.join(map(str, seeds))}", "suite": "tiny",
           "preset": "default", "table": "main", "mode": "full", "seeds": seeds, "elapsed_seconds": 1.0,
           "cpu_seconds": 1.0, "timings_seconds": {},
           "machine": {"cpu": "x", "cpus": 2, "torch_threads": 1, "loadavg_start": [0.0, 0.0, 0.0]},
           "results": {"dil": {"runs": dil, "domains": ["a", "b"], "tasks": ["a", "b"]},
                       "dg": {"runs": dg, "domains": ["a", "b"]}},
           "adaptation": {}, "row_order": {"dil": list(dil), "dg": list(dg)},
           "variants": {p: [{"name": n, "kind": "mira", "recipe": {"lr": 0.003}} for n in variants]
                        for p in ("dil", "dg")}}
    return doc | extra


def _cl(seed, acc):
    return {"seed": seed, "avg_acc": acc, "forgetting": 0.1, "probe": None}


def _dg(seed, held_out, acc):
    return {"seed": seed, "held_out": held_out, "held_out_acc": acc}


def _merge(tmp_path, *docs):
    parts = []
    for i, doc in enumerate(docs):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "results.json").write_text(json.dumps(doc))
        parts.append(str(tmp_path / f"p{i}"))
    return report.merge(parts, str(tmp_path / "out"), "merge")


def _row(table, name):
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {name}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_merged_dg_rows_show_their_seed_count_and_every_part_keeps_its_rows_record(tmp_path):
    # Part A: every row for seed 0; part B: one row for seeds 1 and 2 (the case merge's docstring names).
    # DIL rows on fewer seeds were labelled, DG rows not; and "variants" kept part A's rows only.
    a = _doc([0], {"mira": [_cl(0, .5)], "joint LoRA": [_cl(0, .9)]},
             {"mira": [_dg(0, "a", .5), _dg(0, "b", .3)], "joint LoRA": [_dg(0, "a", .9), _dg(0, "b", .7)]},
             ["mira", "joint LoRA"])
    b = _doc([1, 2], {"mira": [_cl(1, .4), _cl(2, .6)], "improved": [_cl(1, .7), _cl(2, .8)]},
             {"mira": [_dg(s, h, .4) for s in (1, 2) for h in "ab"],
              "improved": [_dg(s, h, .6) for s in (1, 2) for h in "ab"]}, ["mira", "improved"])
    merged = _merge(tmp_path, a, b)
    table = report.tables(merged["results"], merged["row_order"])
    dg = table[table.index("| DG variant"):]
    assert _row(dg, "mira")[0] == "mira"
    assert _row(dg, "joint LoRA")[0] == "joint LoRA (1 seed)"
    assert _row(dg, "improved")[0] == "improved (2 seeds)"
    assert _row(table[: table.index("| DG variant")], "improved")[0] == "improved (2 seeds)"  # DIL, as before
    for proto in ("dil", "dg"):
        assert [v["name"] for v in merged["variants"][proto]] == ["mira", "joint LoRA", "improved"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["variants"] == merged["variants"]


def test_the_dg_mean_is_over_the_seeds_that_ran_every_fold(tmp_path):
    # The mean column averaged whatever folds each seed had: seed 1's fold a alone (60%) counted as a
    # seed's mean over both domains (mira: 43.3 where the complete seeds give 35.0).
    docs = [_doc([0], {"mira": [_cl(0, .5)]}, {"mira": [_dg(0, "a", .4), _dg(0, "b", .2)]}, ["mira"]),
            _doc([1], {"mira": [_cl(1, .3)]}, {"mira": [_dg(1, "a", .6)]}, ["mira"]),
            _doc([2], {"mira": [_cl(2, .4)]}, {"mira": [_dg(2, "a", .5), _dg(2, "b", .3)]}, ["mira"])]
    merged = _merge(tmp_path, *docs)
    table = report.tables(merged["results"], merged["row_order"])
    label, a, b, mean = _row(table[table.index("| DG variant"):], "mira")
    assert (a, b) == ("50.0 ± 10.0", "25.0 ± 7.1")  # each fold over the seeds that ran it
    assert mean == "35.0 ± 7.1"  # seeds 0 and 2: (0.4 + 0.2) / 2 and (0.5 + 0.3) / 2
    assert label == "mira (seed 1 missing folds, not in the mean)"


def test_the_retrieval_plot_is_titled_by_the_seed_it_profiled(tmp_path, monkeypatch):
    # python -m mira.experiments --seeds 2 1 profiles seed 2 (the first given); the plot said seed 1.
    titled = []
    monkeypatch.setattr(report, "plot_profiles", lambda *args: titled.append(args[-1]))
    profile = {"mira": [[[0.5, 0.5], [0.5, 0.5]]]}
    doc = _doc([2, 1], {"mira": [_cl(2, .5), _cl(1, .4)]}, {}, ["mira"], dil_retrieval_profile_seed0=profile,
               dil_retrieval_slot_tasks={"mira": [0, 1]}, dil_retrieval_profile_seed=2)
    report.write(doc, str(tmp_path / "recorded"))
    doc.pop("dil_retrieval_profile_seed")  # a results.json written before the seed was recorded: seeds[0]
    report.write(doc, str(tmp_path / "older"))
    assert titled == [2, 2]
    # merged with another part, the profiles keep the seed they are of
    other = _doc([0], {"mira": [_cl(0, .3)]}, {}, ["mira"], dil_retrieval_profile_seed0={})
    merged = _merge(tmp_path, dict(doc, dil_retrieval_profile_seed=2), other)
    assert merged["dil_retrieval_profile_seed"] == 2 and merged["dil_retrieval_profile_seed0"] == profile
    assert titled == [2, 2, 2]
