"""CI smoke run of ``python -m mira.experiments all --quick`` from a clean cache: loose sanity only.

The quick mode pre-trains its own backbone (CI starts clean), runs every protocol and variant
for one seed with short schedules, and must finish inside its 2-minute budget on a 2-core CPU.
Assertions are deliberately loose (finite, better than chance where the quick schedule can be).
"""

import json
import math

import pytest

from mira.experiments import __main__ as cli
from mira.experiments import protocols as P

CHANCE = 0.1


@pytest.mark.filterwarnings("ignore")
def test_quick_mode_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    doc = cli.main(["all", "--quick", "--out", str(out), "--no-progress"])
    assert not doc["backbone"]["cached"]  # the clean-start path, as in CI
    assert (out / "retrieval_weights.png").stat().st_size > 1000
    assert "| mira |" in (out / "results.md").read_text()
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary_mean_std"].keys() == {"dil", "cil", "dg"}

    for setting in ("dil", "cil"):
        runs = doc["results"][setting]["runs"]
        assert set(runs) == set(P.CL_VARIANTS)
        for variant, rs in runs.items():
            for r in rs:
                assert all(math.isfinite(a) and 0 <= a <= 1 for a in r["final_row"]), (setting, variant)
                if "acc" in r:
                    rows = r["acc"]
                    assert all(math.isfinite(rows[i][j]) for i in range(len(rows)) for j in range(i + 1))
        best = max(r["avg_acc"] for rs in runs.values() for r in rs)
        assert best > 2 * CHANCE, (setting, best)
        assert runs["mira"][0]["avg_acc"] > CHANCE, setting
        # the first task is learned well above chance before anything else happens
        assert runs["mira"][0]["acc"][0][0] > 3 * CHANCE, setting
    dg = doc["results"]["dg"]["runs"]
    assert set(dg) == set(P.DG_VARIANTS)
    assert all(math.isfinite(r["held_out_acc"]) for rs in dg.values() for r in rs)
    # upright is the domain nearest the backbone's pre-training: some variant transfers to it
    assert max(r["held_out_acc"] for rs in dg.values() for r in rs if r["held_out"] == "upright") > 1.5 * CHANCE
    prof = doc["dil_retrieval_profile_seed0"]["mira"]
    assert all(math.isfinite(w) for block in prof for row in block for w in row)
