"""Merging runs of single seeds and the tables made from them (no training: hand-written results)."""

import json
import os

import pytest

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


def _usage_error(capsys, *argv) -> str:
    """The one line of a refused command line (exit status 2, as argparse's own errors)."""
    with pytest.raises(SystemExit) as exc:
        report.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m mira.experiments.report: error: "), err
    return err


def test_record_refuses_a_quick_part_and_leaves_the_recorded_tables(tmp_path, monkeypatch, capsys):
    # python -m mira.experiments refuses --record --quick; report --record took a quick part (exit 0): it
    # replaced the recorded results.json / results.md with the smoke run's and deleted the recorded plot.
    monkeypatch.chdir(tmp_path)  # --record writes to ./results/experiments/<suite>: here, never the repository's
    recorded = tmp_path / "results" / "experiments" / "tiny"
    recorded.mkdir(parents=True)
    for name in ("results.json", "results.md", "retrieval_weights.png"):
        (recorded / name).write_text(f"the full run's {name}")
    full = _doc([0], {"mira": [_cl(0, .5)]}, {}, ["mira"])
    quick = dict(_doc([1], {"mira": [_cl(1, .4)]}, {}, ["mira"]), mode="quick")
    for i, doc in enumerate((full, quick)):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "results.json").write_text(json.dumps(doc))
    for parts in ([tmp_path / "p1"], [tmp_path / "p0", tmp_path / "p1"]):
        err = _usage_error(capsys, "--record", *map(str, parts))
        assert "--record writes the full run's tables" in err and f"{tmp_path / 'p1'} holds a quick run" in err, err
    assert sorted(os.listdir(tmp_path / "results" / "experiments")) == ["tiny"]
    for name in ("results.json", "results.md", "retrieval_weights.png"):
        assert (recorded / name).read_text() == f"the full run's {name}"
    report.main([str(tmp_path / "p1"), "--out", str(tmp_path / "merged")])  # --out takes it
    assert (tmp_path / "merged" / "results.md").exists()


def test_a_row_on_fewer_seeds_than_the_header_states_shows_its_count(tmp_path):
    # A DIL part of seed 0 and a DG part of seed 1: the header said "2 seed(s) [0, 1], mean ± std over seeds"
    # above rows of one seed each, unlabelled, whose "± 0.0" read as no spread.
    a = _doc([0], {"mira": [_cl(0, .5)]}, {}, ["mira"])
    b = _doc([1], {}, {"mira": [_dg(1, "a", .4), _dg(1, "b", .2)]}, ["mira"])
    merged = _merge(tmp_path, a, b)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "2 seed(s) [0, 1]" in md
    dil, dg = md[md.index("| DIL variant"): md.index("| DG variant")], md[md.index("| DG variant"):]
    assert _row(dil, "mira")[:2] == ["mira (1 seed)", "50.0 ± 0.0"]
    assert _row(dg, "mira")[0] == "mira (1 seed)"
    # without the header's count (tables() as before), a table's fullest row sets it
    table = report.tables(merged["results"], merged["row_order"])
    assert _row(table[: table.index("| DG variant")], "mira")[0] == "mira"


@pytest.mark.parametrize("truncated", [0, 1])
def test_a_truncated_part_is_named(truncated, tmp_path, capsys):
    # The usage error did not say which part's results.json failed to parse (the first part's: a traceback).
    parts = []
    for i, seed in enumerate((0, 1)):
        (tmp_path / f"p{i}").mkdir()
        text = json.dumps(_doc([seed], {"mira": [_cl(seed, .5)]}, {}, ["mira"]))
        (tmp_path / f"p{i}" / "results.json").write_text(text[:200] if i == truncated else text)
        parts.append(str(tmp_path / f"p{i}"))
    err = _usage_error(capsys, *parts, "--out", str(tmp_path / "merged"))
    assert f"{tmp_path / f'p{truncated}' / 'results.json'} does not parse as JSON" in err, err
    assert not (tmp_path / "merged").exists()
