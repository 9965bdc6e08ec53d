"""Smoke test of the serving benchmark (benchmarks/serving.py) on a tiny ViT: every cheap path is
built, judged against the float64 model and timed, and the record says what it ran on. Timing
itself is not asserted (a test cannot know a machine's speed). The paths whose builds take tens of
seconds (torch.compile, AOTInductor, ONNX) run in the `slow` test (`make test-slow`), which also
checks that the cache of compiled exports is reused; CI covers their export functions in
tests/test_mira_export.py."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("timm")
import torch  # noqa: E402

from benchmarks import serving  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")
TINY = {"img_size": 32, "patch_size": 8, "depth": 1}
QUICK = ["--model", "vit_tiny_patch16_224", "--slots", "4", "--judge-batch", "4", "--budget", "0", "--min-rounds", "3"]


def test_a_tiny_run_times_every_path_against_stock_and_records_machine_and_commit(tmp_path, capsys):
    argv = [*QUICK, "--batch-sizes", "1", "3", "--paths", "folded", "lora", "merged", "export",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert serving.main(argv, model_kwargs=TINY) == 0
    # One line per batch size, written as each is timed (a killed run keeps the finished ones).
    records = [json.loads(line) for line in (tmp_path / "serving.jsonl").read_text().splitlines()]
    assert [r["batch"] for record in records for r in record["results"]] == [1, 3]
    assert len({record["timestamp"] for record in records}) == 1
    record = records[0]
    assert record["machine"]["cpu"] and record["commit"] != "unknown"
    assert record["config"]["paths"] == ["folded", "lora", "merged", "export"]
    assert set(record["build_s"]) == {"fold", "export"}
    assert set(record["vs_float64"]) == {"merged", "export"}  # folded is a mean by design; lora is eager
    assert all(0 < v["error"] <= v["bound"] for v in record["vs_float64"].values())
    for res in (r for record in records for r in record["results"]):
        names = {"stock", "live", "folded", "lora", "merged", "export"}
        assert set(res["median_ms"]) == names and all(ms > 0 for ms in res["median_ms"].values())
        assert set(res["ratio_vs_stock"]) == names - {"stock"} and res["rounds"] >= 3
        diffs = res["max_abs_diff_vs_live"]
        assert diffs["export"] == 0  # the exported program runs the same fused op
        assert diffs["stock"] > 1e-3 and diffs["folded"] > 0  # MIRA changes the output; folded is a mean
    tables = (tmp_path / "serving.md").read_text().split("```\n\n")
    assert len([t for t in tables if t.strip()]) == 2
    printed = capsys.readouterr().out
    for table in filter(str.strip, tables):
        assert "vs stock (95% CI)" in table and "error vs float64" in table
        assert table.strip("`\n") in printed
    # The summary: one row per path, a cell per batch size, rebuilt from the jsonl after each batch size.
    summary = (tmp_path / "serving_summary.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| path")}
    assert list(rows) == ["stock", "live", "folded", "lora", "merged", "export"]
    assert rows["export"][2].startswith("yes: ") and rows["folded"][2].startswith("not judged")
    ms_columns = (3, 6)  # B=1 ms, B=3 ms
    for name, row in rows.items():
        assert all(float(row[i].split()[0]) == pytest.approx(res["median_ms"][name], abs=0.05)
                   for i, res in zip(ms_columns, (r for record in records for r in record["results"])))
    assert "B=1 vs live | B=1 vs stock" in summary and "B=3 ms" in summary and "family" in summary
    assert serving.main(["--out", str(tmp_path), "--summarize"]) == 0 and capsys.readouterr().out == summary


def test_summarize_without_records_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serving.main(["--out", str(tmp_path), "--summarize"])
    assert exit_.value.code == 2  # argparse's one-line error, not a bare message with exit 1
    assert "--summarize: no " in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_repeated_batch_sizes_are_refused_before_the_run(monkeypatch, capsys):
    monkeypatch.setattr(serving, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit_:
        serving.main(["--batch-sizes", "1", "8", "1"])
    assert exit_.value.code == 2 and "--batch-sizes repeats 1" in capsys.readouterr().err


def _fake_record(interval: str | None, ratio: float) -> dict:
    r = {"ratio": ratio, "lo": ratio - 0.01, "hi": ratio + 0.01, "pairs": 20, "width": 0.02}
    record = {"timestamp": f"t{ratio}", "commit": "c", "config": {"model": "m", "model_kwargs": {}, "slots": 2,
                                                                  "threads": 1, "dtype": "float32"},
              "machine": {"cpu": "cpu", "family": "6", "model_id": "1", "logical_cpus": 1, "torch": "t"},
              "vs_float64": {}, "results": [{"batch": 1, "median_ms": {"stock": 1.0, "live": 1.0},
                                             "ratio_vs_stock": {"live": r}, "ratio_vs_live": {"stock": r},
                                             "rounds": 20, "stopped_by": "budget"}]}
    if interval is not None:
        record["interval"] = interval
    return record


def test_the_summary_labels_each_ratio_by_its_records_interval_method():
    """The records of 2026-12-03 (no 'interval' field) hold percentile-bootstrap intervals: a rewrite of
    the summary must not call them distribution-free, as every newer record's are."""
    old, new = _fake_record(None, 1.5), _fake_record("distribution-free", 1.25)
    assert "95% bootstrap interval," in serving.summary_markdown([old])
    assert "distribution-free 95% interval," in serving.summary_markdown([new])
    assert "bootstrap" not in serving.summary_markdown([old, new])  # the newest run fills every cell
    old["results"][0]["batch"] = 8  # a batch size only the old run timed: its cells keep its method
    mixed = serving.summary_markdown([old, new])
    assert "95% interval of the method its run names" in mixed
    assert "1.500 [1.490, 1.510] (percentile bootstrap)" in mixed
    assert "1.250 [1.240, 1.260] (distribution-free)" in mixed
    assert "; percentile bootstrap intervals" in mixed and "; distribution-free intervals" in mixed


def test_a_new_record_names_its_interval_method(tmp_path, monkeypatch):
    """Nothing is timed: the interleaved timing is replaced by fixed times."""

    def fake_timing(calls, **kwargs):
        return serving._pairs.PairResult(list(calls), {n: [1e-3 * (1 + k % 3) for k in range(8)] for n in calls},
                                         0.0, "budget")

    monkeypatch.setattr(serving._pairs, "time_interleaved", fake_timing)
    argv = [*QUICK, "--batch-sizes", "1", "--paths", "folded", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert serving.main(argv, model_kwargs=TINY) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "serving.jsonl").read_text().splitlines()]
    assert record["interval"] == "distribution-free"
    assert "distribution-free 95% interval," in (tmp_path / "serving_summary.md").read_text()


def test_help_shows_every_default():
    text = " ".join(serving.parser().format_help().split())
    for action in serving.parser()._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default})" in text, action.dest


@torch.no_grad()
def test_a_path_whose_output_is_wrong_stops_the_run_before_timing():
    _, model = serving.build_models("vit_tiny_patch16_224", 2, **TINY)
    x = torch.randn(8, 3, 32, 32)
    good = serving.judge({"export": model}, {"live": model}, x)
    assert good["export"]["error"] == good["export"]["eager_error"] <= good["export"]["bound"]
    with pytest.raises(AssertionError, match="onnxruntime"):
        serving.judge({"export": model, "onnxruntime": lambda x: model(x) * 1.001}, {"live": model}, x)


def test_cached_exports_are_reused_and_a_failed_build_leaves_nothing(tmp_path):
    built = []

    def build(path):
        built.append(path)
        path.write_text("package")

    build_s = {}
    target = tmp_path / "model.pt2"
    assert serving._cached(target, build, build_s, "aoti") == target and target.read_text() == "package"
    assert serving._cached(target, build, build_s, "aoti") == target and len(built) == 1 and "aoti" in build_s

    def failing(path):
        path.write_text("half")
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError, match="compile failed"):
        serving._cached(tmp_path / "model.onnx", failing, {}, "onnx")
    assert not list(tmp_path.glob("model*.onnx"))


@pytest.mark.slow
def test_the_compiled_paths_build_into_the_cache_once_then_are_judged_and_timed(tmp_path):
    """torch.compile, AOTInductor and onnxruntime on the tiny ViT: --build-only fills the cache, the
    timing run reuses its files (no AOTInductor / ONNX build) and still judges them against float64."""
    pytest.importorskip("onnxruntime")
    paths = ["compile", "aoti", "onnxruntime"]
    common = [*QUICK, "--batch-sizes", "1", "2", "--paths", *paths, "--cache", str(tmp_path / "cache")]
    assert serving.main([*common, "--build-only", "--out", str(tmp_path / "built")], model_kwargs=TINY) == 0
    assert not (tmp_path / "built").exists()  # --build-only times and writes nothing
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(f.name for f in folder.iterdir()) == ["model.onnx", "model.pt2"]
    assert serving.main([*common, "--out", str(tmp_path)], model_kwargs=TINY) == 0
    records = [json.loads(line) for line in (tmp_path / "serving.jsonl").read_text().splitlines()]
    assert [r["batch"] for record in records for r in record["results"]] == [1, 2]
    record = records[-1]
    assert "aoti" not in record["build_s"] and "onnx" not in record["build_s"]  # reused, not rebuilt
    assert set(record["vs_float64"]) == set(paths)
    assert all(0 < v["error"] <= v["bound"] for v in record["vs_float64"].values())
    for res in (r for record in records for r in record["results"]):
        assert set(res["median_ms"]) == {"stock", "live", *paths} and all(ms > 0 for ms in res["median_ms"].values())
        assert all(res["max_abs_diff_vs_live"][p] < 1e-4 for p in paths)
