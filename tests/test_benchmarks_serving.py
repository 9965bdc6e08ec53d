"""Smoke test of the serving benchmark (benchmarks/serving.py) on a tiny ViT: every cheap path is
built, checked against the live model and timed, and the record says what it ran on. Timing
itself is not asserted (a test cannot know a machine's speed); AOTInductor and ONNX are left to
the benchmark itself and to tests/test_mira_export.py (their builds take tens of seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("timm")
from benchmarks import serving  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")


def test_a_tiny_run_times_every_path_against_stock_and_records_machine_and_commit(tmp_path, capsys):
    argv = ["--model", "vit_tiny_patch16_224", "--batch-sizes", "1", "3", "--slots", "4", "--paths", "folded",
            "lora", "merged", "export", "--budget", "0", "--min-rounds", "3", "--out", str(tmp_path)]
    assert serving.main(argv, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}) == 0
    record = json.loads((tmp_path / "serving.jsonl").read_text().splitlines()[-1])
    assert record["machine"]["cpu"] and record["commit"] != "unknown"
    assert record["config"]["paths"] == ["folded", "lora", "merged", "export"]
    assert set(record["build_s"]) == {"fold", "export"}
    assert [r["batch"] for r in record["results"]] == [1, 3]
    for res in record["results"]:
        names = {"stock", "live", "folded", "lora", "merged", "export"}
        assert set(res["median_ms"]) == names and all(ms > 0 for ms in res["median_ms"].values())
        assert set(res["ratio_vs_stock"]) == names - {"stock"} and res["rounds"] >= 3
        diffs = res["max_abs_diff_vs_live"]
        assert diffs["export"] < 1e-4  # the exported program runs the same fused op
        assert diffs["stock"] > 1e-3 and diffs["folded"] > 0  # MIRA changes the output; folded is a mean
    table = (tmp_path / "serving.md").read_text()
    assert "vs stock (95% CI)" in table and "export" in table and table.strip("`\n") in capsys.readouterr().out


def test_exports_that_differ_from_eager_stop_the_run_before_timing():
    serving.check_exports({"export": 1e-6, "folded": 1.0}, scale=3.0)  # folded may differ: a mean
    with pytest.raises(AssertionError, match="onnxruntime differs from eager"):
        serving.check_exports({"onnxruntime": 1e-2}, scale=3.0)
