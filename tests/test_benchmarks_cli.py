"""The benchmark tools' command lines, as a performance engineer meets them: a bad argument is a
one-line error and exit code 2 before any work starts (not a traceback minutes into a run, nor a
run that loses its results at the end), and what the tools write is valid for strict JSON readers.

Nothing is timed here: the work each tool would start is replaced by a function that fails the
test, so a check that came too late shows as that failure, at once.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from benchmarks import _cli, _pairs, latency  # noqa: E402


class _Started(AssertionError):
    pass


def _never(*args, **kwargs):
    raise _Started("the tool started its run before checking its arguments")


@pytest.fixture
def no_runs(monkeypatch):
    """Every tool's first piece of real work fails the test."""
    from benchmarks import host_path, op_cpu, serving

    monkeypatch.setattr(latency, "build_variants", _never)  # latency, budget, bank_dtype, in_situ
    monkeypatch.setattr(host_path, "run", _never)
    monkeypatch.setattr(serving, "run", _never)
    monkeypatch.setattr(op_cpu, "measure_bandwidth", _never)


def _exits_2(tool: str, argv: list[str], capsys) -> str:
    main = importlib.import_module(f"benchmarks.{tool}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, f"{tool} {argv}: exit {exc.value.code}"
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_output_paths_that_cannot_be_written_are_refused_before_the_run(tmp_path, no_runs, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    missing = tmp_path / "no" / "such" / "folder" / "out.json"
    cases = [
        ("latency", ["--results-dir", str(a_file)], "--results-dir"),
        ("budget", ["--json", str(tmp_path)], "--json"),
        ("budget", ["--json", str(missing)], "--json"),
        ("bank_dtype", ["--json", str(tmp_path)], "--json"),
        ("in_situ", ["--json", str(tmp_path)], "--json"),
        ("host_path", ["--json", str(tmp_path)], "--json"),
        ("serving", ["--out", str(a_file)], "--out"),
        ("serving", ["--out", str(tmp_path), "--cache", str(a_file)], "--cache"),
        ("op_cpu", ["--out", str(a_file)], "--out"),
        ("gpu_check", ["--dry-run", "--out", str(a_file)], "--out"),
        ("gpu_sweep", ["--dry-run", "--out", str(a_file)], "--out"),
    ]
    for tool, argv, flag in cases:
        assert flag in _exits_2(tool, argv, capsys), (tool, argv)
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_output_problem_says_why_and_leaves_nothing_behind(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert _cli.output_problem(tmp_path / "new" / "folder", folder=True) is None  # created by the run
    assert _cli.output_problem(tmp_path / "new.json", folder=False) is None
    assert "not a folder" in _cli.output_problem(a_file, folder=True)
    assert "cannot be created" in _cli.output_problem(a_file / "sub", folder=True)
    assert "is a folder" in _cli.output_problem(tmp_path, folder=False)
    assert "does not exist" in _cli.output_problem(tmp_path / "no" / "x.json", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("tool, argv", [
    ("latency", ["--batch-sizes", "0"]),  # ran its end-to-end rounds, then divided by zero
    ("latency", ["--batch-sizes", "1", "-2"]),
    ("latency", ["--module-budget", "-1"]),  # silently meant the default
    ("latency", ["--e2e-budget", "-5"]),
    ("latency", ["--e2e-budget", "inf"]),
    ("latency", ["--threads", "-3"]),
    ("latency", ["--slots", "0"]),
    ("latency", ["--e2e-width", "0"]),
    ("latency", ["--sweep-slots", "0"]),
    ("latency", ["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--rank", "0"]),
    ("budget", ["--batch-sizes", "0"]),
    ("budget", ["--budget", "-1"]),
    ("budget", ["--threads", "-1"]),
    ("bank_dtype", ["--batch-sizes", "-1"]),
    ("bank_dtype", ["--budget", "nan"]),
    ("in_situ", ["--batch", "0"]),
    ("in_situ", ["--rounds", "5"]),  # 3-5 printed [-inf, +inf] as an interval
    ("host_path", ["--batch", "0"]),
    ("host_path", ["--inner", "0"]),
    ("op_cpu", ["--batches", "0"]),
    ("op_cpu", ["--target", "0"]),
    ("serving", ["--batch-sizes", "0"]),  # exited 1, not 2
    ("serving", ["--budget", "-1"]),
    ("serving", ["--min-rounds", "0"]),
    ("e2e_interval", ["--block", "0"]),  # ZeroDivisionError
    ("e2e_interval", ["--target", "0"]),
    ("e2e_interval", ["/no/such/records.jsonl"]),
    ("gpu_model", ["--batches", "0"]),  # KeyError deep in the model
    ("gpu_sweep", ["--dry-run", "--out", "OUT", "--batches", "0"]),
    ("gpu_sweep", ["--dry-run", "--out", "OUT", "--dtypes", "float8"]),
    ("gpu_sweep", ["--dry-run", "--out", "OUT", "--budget", "-1"]),
])
def test_bad_numbers_are_one_line_errors_with_exit_code_2(tool, argv, tmp_path, no_runs, capsys):
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    last = _exits_2(tool, argv, capsys)
    assert "error:" in last and "Traceback" not in last


@pytest.mark.parametrize("tool, argv, flag", [
    # Each was a traceback once the model was built (or, for the files, at the end of the run).
    ("latency", ["--separation", "bogus"], "--separation"),
    ("latency", ["--device", "xyz"], "--device"),
    ("latency", ["--device", "meta"], "--device"),
    ("latency", ["--slices", "q", "z"], "--slices"),
    ("latency", ["--slices", "q", "q"], "--slices"),
    ("latency", ["--model", "not_a_model"], "--model"),
    ("serving", ["--model", "not_a_model"], "--model"),
    ("gpu_model", ["--measured", "MISSING"], "--measured"),
    ("gpu_model", ["--before", "MISSING"], "--before"),
    ("gpu_model", ["--calibrate", "NOT_JSON"], "--calibrate"),
    ("gpu_check", ["--out", "OUT", "--work", "OUT", "--record-from", "MISSING"], "--record-from"),
])
def test_bad_names_and_files_are_one_line_errors_with_exit_code_2(tool, argv, flag, tmp_path, no_runs, monkeypatch,
                                                                  capsys):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "record", _never)
    not_json = tmp_path / "not.json"
    not_json.write_text("#!/bin/bash\n")
    where = {"OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing.json"), "NOT_JSON": str(not_json)}
    last = _exits_2(tool, [where.get(a, a) for a in argv], capsys)
    assert "error:" in last and flag in last and "Traceback" not in last


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON (jq, JavaScript and most parsers refuse it)")

    return json.loads(text, parse_constant=refuse)


def test_record_json_writes_non_finite_numbers_as_null():
    import numpy as np
    import torch

    record = {"lo": -math.inf, "hi": math.inf, "floor": math.nan, "n": 3, "x": [1.5, np.float32("nan")],
              "t": (np.float64(2.0), torch.tensor(float("inf")))}
    assert _strict_json(_pairs.record_json(record)) == {"lo": None, "hi": None, "floor": None, "n": 3,
                                                        "x": [1.5, None], "t": [2.0, None]}


def test_a_short_latency_run_writes_strict_json_and_its_plot_reads_it(tmp_path, monkeypatch):
    # Fewer than 6 end-to-end rounds: an unbounded interval, which json.dumps wrote as -Infinity / Infinity.
    from benchmarks import plots
    from tests.test_benchmarks_smoke import _tiny_vit

    monkeypatch.setattr(latency, "create_model", lambda name: _tiny_vit())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--model", "tiny", "--batch-sizes", "2", "--slots", "4", "--e2e-budget", "0", "--module-budget", "0.05",
                "--op-budget", "0.05", "--quick", "--results-dir", str(tmp_path)]
        assert latency.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    record = _strict_json((tmp_path / "latency.jsonl").read_text().splitlines()[-1])
    head = record["results"][0]["end_to_end_headline"]
    assert head["rounds"] < 6 and head["lo"] is None and head["hi"] is None
    assert [p.name for p in plots.write_plots(tmp_path)] == ["latency_overhead_vs_batch.png"]


def test_a_short_serving_run_writes_strict_json_and_its_summary_reads_it(tmp_path):
    from benchmarks import serving

    argv = ["--model", "vit_tiny_patch16_224", "--slots", "4", "--judge-batch", "4", "--budget", "0",
            "--min-rounds", "3", "--batch-sizes", "1", "--paths", "folded", "--out", str(tmp_path),
            "--cache", str(tmp_path / "cache")]
    assert serving.main(argv, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1}) == 0
    record = _strict_json((tmp_path / "serving.jsonl").read_text().splitlines()[-1])
    assert record["results"][0]["ratio_vs_stock"]["live"]["lo"] is None
    assert "[no interval: 3 rounds]" in serving.write_summary(tmp_path)


def test_op_cpu_writes_the_tracked_results_only_with_record(no_runs, capsys):
    from benchmarks import op_cpu

    assert op_cpu.results_folder(None, record=False) == latency.SCRATCH_DIR
    assert op_cpu.results_folder(None, record=True) == latency.RESULTS_DIR
    assert "never recorded" in _exits_2("op_cpu", ["--quick", "--record"], capsys)


def _says_where_and_when(text: str, machine: dict, commit: str) -> None:
    assert f"family {machine['family']} model {machine['model_id']} stepping {machine['stepping']}" in text, text
    assert f"commit {commit}" in text and "2026-" in text, text


def test_printed_figures_name_commit_date_cpu_and_isa(tmp_path, capsys):
    from benchmarks import budget, e2e_interval

    machine = {**_pairs.machine_info(), "family": "25", "model_id": "17", "stepping": "1", "mira_cpu_isa": ["avx2"]}
    floor = {"gemm_macs_per_s": 1e11, "compute_s": 1e-5, "extra_macs": 1e6, "memory_s": 2e-5,
             "bytes": {"banks": 10**6, "keys": 10**4}, "dram_bytes_per_s": 5e10, "per_block_s": 2e-5,
             "bound": "memory", "percent": 0.1, "serial_s": 3e-5, "serial_percent": 0.15}
    part = {"median_s": 1e-5, "lo_s": 0.5e-5, "hi_s": 2e-5}
    rec = {"model": "m", "rank": 4, "slots": 30, "n_blocks": 12, "commit": "abc1234",
           "timestamp": "2026-12-07T00:00:00Z", "machine": machine, "bandwidth": {"bytes_per_s": 5e10, "threads": 2},
           "batches": [{"batch": 1, "backbone_s": 0.2, "floor": floor,
                        "budget": {"stock": part, "parts": {"retrieval": part}, "extra": part, "rounds": 30,
                                   "evict": True}}]}
    text = budget.format_budget(rec)  # printed "AMD EPYC, ... ISA [...]": no family / model / stepping
    _says_where_and_when(text, machine, "abc1234")
    assert "MIRA CPU ISA avx2" in text

    rounds = [0.010 + 0.0001 * (i % 7) for i in range(40)]
    line = {"commit": "abc1234", "timestamp": "2026-12-07T00:00:00Z", "machine": machine,
            "results": [{"batch": 1, "end_to_end": {"seconds": 2.0, "times_s": {"fused": [1.01 * t for t in rounds],
                                                                                "backbone": rounds}}}]}
    path = tmp_path / "latency.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert e2e_interval.main([str(path), "--min-rounds", "10"]) == 0  # printed the CPU's model name alone
    _says_where_and_when(capsys.readouterr().out, machine, "abc1234")


TOOLS = ("latency", "budget", "op_cpu", "serving", "host_path", "in_situ", "bank_dtype", "e2e_interval", "gpu_check",
         "gpu_model", "gpu_sweep", "plots")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_every_option_with_its_default(tool, capsys):
    import re

    module = importlib.import_module(f"benchmarks.{tool}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    required = _required_options(module)
    for block in filter(str.strip, blocks):
        option = block.split()[0]
        if option.startswith("-h"):
            continue
        said = " ".join(block.split())
        if option in required:  # gpu_sweep's --out said "(default: none)", and the run then demanded it
            assert said.endswith("(required)") and "default" not in said, f"{tool} {option}: {said!r}"
            continue
        assert "default" in said, f"{tool} {option}: no default in its help: {said!r}"
        assert said.count("default") == 1 or "(default: " not in said.split("(default: ", 1)[1], \
            f"{tool} {option}: two defaults: {said!r}"
        assert "(default: )" not in said and "(default: None)" not in said, f"{tool} {option}: {said!r}"
    if tool == "serving":  # "0: torch's default" read as the default stated, so none was shown
        assert "(0: torch's own choice) (default: 0)" in " ".join(text.split())
    if tool == "latency":  # the help said 150 s at B=1, where the run takes up to 600
        budgets = latency.DEFAULT_E2E_BUDGET
        assert f"(default: {budgets[1]:.0f} at B=1, {budgets[8]:.0f} at B=8" in " ".join(text.split())


def _required_options(module) -> set[str]:
    """The options a tool's parser requires, read from the parser its main builds."""
    import argparse

    seen = []
    real = argparse.ArgumentParser.parse_args

    def capture(parser, args=None, namespace=None):
        seen.append(parser)
        return real(parser, args, namespace)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            module.main(["--help"])
    return {a.option_strings[0] for p in seen for a in p._actions if a.required and a.option_strings}


def test_ctrl_c_inside_a_record_write_waits_for_the_write_to_end():
    import os
    import signal

    done = []
    # Python's own Ctrl-C handler, whatever this process inherited: a shell's background job starts with
    # SIGINT ignored (the CI run launched with `&` failed here), and then Ctrl-C reaches nothing to defer.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _cli.whole_or_not_at_all():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the rest of the record")
        assert done == ["the rest of the record"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_during_a_run_is_a_one_line_exit_130_and_writes_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.latency", "--model", "vit_tiny_patch16_224", "--batch-sizes", "1",
           "--threads", "1", "--e2e-budget", "60", "--results-dir", str(out)]
    root = latency.RESULTS_DIR.parent.parent
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        # The child starts with SIGINT's default disposition, which Python turns into KeyboardInterrupt:
        # one inherited from a background job (ignored) would make the run deaf to the signal below.
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(root)},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 240
        while "end to end:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # inside the timed rounds
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)"), text[-3000:]
    assert not out.exists() or not any(out.iterdir())


def test_bank_dtype_reads_its_floor_as_budget_and_latency_do(tmp_path, monkeypatch):
    # The floor's bandwidth is the timed rounds' own eviction reads (budget, latency); bank_dtype used
    # the start-of-run read, so the three tools printed different floors for the same projection.
    from benchmarks import bank_dtype
    from tests.test_benchmarks_smoke import _tiny_vit

    build = latency.build_variants
    monkeypatch.setattr(latency, "build_variants", lambda cfg, model=None: build(cfg, model=_tiny_vit()))
    out = tmp_path / "bank_dtype.json"
    assert bank_dtype.main(["--batch-sizes", "2", "--budget", "0", "--threads", "1", "--json", str(out)]) == 0
    floors = _strict_json(out.read_text())["batches"][0]["floors"]
    assert {f["bandwidth_source"] for f in floors.values()} == {"the eviction reads of the timed rounds"}


def test_an_unbounded_end_to_end_interval_is_no_evidence_of_agreement(tmp_path):
    # With --min-e2e-rounds below 6 a run of 5 rounds has the interval (-inf, inf), which contains any
    # module figure: that read "met".
    res = {"batch": 8, "floor": {"percent": 0.1}, "module": {"percent": 0.1, "lo": 0.05, "hi": 0.2, "pairs": 200},
           "end_to_end_headline": {"percent": 0.3, "lo": -math.inf, "hi": math.inf, "width": math.inf, "rounds": 5,
                                   "contains_module": True}}
    cfg = latency.BenchConfig(min_module_pairs=100, min_e2e_rounds=3, results_dir=str(tmp_path))
    check = latency.verdicts(res, cfg)[1]
    assert check["check"].startswith("end-to-end interval contains") and check["status"] == "inconclusive"


def test_plots_redraw_the_tracked_results_only_with_record(tmp_path, monkeypatch, capsys):
    from benchmarks import plots

    drawn = []
    monkeypatch.setattr(plots, "write_plots", lambda folder: drawn.append(Path(folder)) or [])
    monkeypatch.setattr(latency, "SCRATCH_DIR", tmp_path)  # .bench/ as a fresh checkout has it: empty
    assert "nothing to draw" in _exits_2("plots", [], capsys)
    (tmp_path / "latency.jsonl").write_text("")
    assert plots.main([]) == 0 and drawn == [tmp_path]
    assert plots.main(["--record"]) == 0 and drawn[-1] == latency.RESULTS_DIR


def test_csv_leaves_undefined_figures_empty():
    # An unbounded interval (fewer than 6 pairs) was written as the text 'inf' / '-inf', and a missing
    # floor as 'nan': a spreadsheet reads those cells as text. Now they are empty, as null in the JSON.
    inf = math.inf
    figure = {"percent": 0.3, "lo": -inf, "hi": inf, "pairs": 4, "rounds": 4}
    record = {"timestamp": "t", "commit": "c", "backend": "cpu", "machine": {"cpu": "x"},
              "config": {"model": "m", "rank": 4, "slots": 30, "device": "cpu"},
              "results": [{"batch": 1, "module": figure, "end_to_end_headline": figure, "floor": {"percent": math.nan},
                           "end_to_end": {"variants": {"mira": {"median_s": 0.1, "runs": 4,
                                                                "vs_backbone": {"ratio": 1.01, "lo": -inf, "hi": inf,
                                                                                "pairs": 4}}}},
                           "overhead": {}}]}
    rows = latency.csv_rows(record)
    assert [r["measure"] for r in rows] == ["module", "end_to_end_headline", "e2e:mira", "floor"]
    for r in rows:
        assert r["lo_pct"] == "" and r["hi_pct"] == ""
    assert rows[0]["overhead_pct"] == 0.3 and rows[3]["overhead_pct"] == ""


@pytest.mark.parametrize("flag", ["--min-module-pairs", "--min-e2e-rounds"])
def test_a_verdict_needs_at_least_one_measurement(flag, no_runs, capsys):
    assert "must be >= 1" in _exits_2("latency", [flag, "0"], capsys)


def test_dram_bandwidth_bounds_stay_ordered_with_too_few_reads(monkeypatch):
    # latency's 5 reads have no 95% interval: the upper bandwidth bound was n / -inf = -0.0.
    from benchmarks import budget

    monkeypatch.setattr(budget, "last_level_cache_bytes", lambda: 1 << 16)
    bw = budget.dram_read_bandwidth(mib=1, repeats=5)
    assert bw["lo"] == 0.0 and bw["hi"] == math.inf and bw["lo"] <= bw["bytes_per_s"] <= bw["hi"]


def _e2e_record(tmp_path, end: str = "\n"):
    """A latency.jsonl of one B=1 record with 40 end-to-end rounds (fused 1% over the backbone)."""
    rounds = [0.010 + 0.0001 * (i % 7) for i in range(40)]
    line = {"commit": "abc1234", "timestamp": "2026-12-07T00:00:00Z", "machine": {},
            "results": [{"batch": 1, "end_to_end": {"seconds": 2.0, "times_s": {"fused": [1.01 * t for t in rounds],
                                                                                "backbone": rounds}}}]}
    path = tmp_path / "latency.jsonl"
    path.write_text(json.dumps(line) + end)
    return path


def test_e2e_interval_skips_a_record_shorter_than_two_blocks(tmp_path, capsys):
    # --block beyond the rounds left the bootstrap empty: NaN estimates, then a traceback.
    from benchmarks import e2e_interval

    path = _e2e_record(tmp_path)
    assert e2e_interval.main([str(path), "--min-rounds", "10", "--block", "50"]) == 0
    assert "fewer than two blocks of --block 50: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["", "sub"])
def test_quick_into_the_results_is_refused_before_the_run(tmp_path, monkeypatch, capsys, where):
    # --quick refused benchmarks/results/ itself only after the whole quick run, and wrote into its subfolders.
    results = tmp_path / "results"
    monkeypatch.setattr(latency, "RESULTS_DIR", results)
    monkeypatch.setattr(latency, "run", _never)
    written = []
    monkeypatch.setattr(latency, "write_record", lambda *a, **k: written.append(a) or {})
    last = _exits_2("latency", ["--quick", "--results-dir", str(results / where), "--no-plots"], capsys)
    assert "--quick runs are never recorded" in last and "--results-dir" in last
    assert not written and not results.exists()
    assert latency.parse_args(["--quick", "--results-dir", str(tmp_path / "scratch")]).quick  # elsewhere: taken


def test_module_and_op_budgets_are_the_b1_ones_at_b1_only():
    # --help: "40 at B=1, 60 above" (op: 15 / 30); B=2..7 got B=1's budgets.
    cfg = latency.BenchConfig(batch_sizes=(1, 2, 7, 8, 16))
    module = {b: latency._module_budget_for(cfg, b) for b in cfg.batch_sizes}
    op = {b: latency._op_budget_for(cfg, b) for b in cfg.batch_sizes}
    one, above = latency.DEFAULT_MODULE_BUDGET[1], latency.DEFAULT_MODULE_BUDGET[8]
    assert module == {1: one, 2: above, 7: above, 8: above, 16: above}
    assert op == {1: latency.DEFAULT_OP_BUDGET[1], **{b: latency.DEFAULT_OP_BUDGET[8] for b in (2, 7, 8, 16)}}
    quick = latency.BenchConfig(batch_sizes=(1, 4), quick=True, results_dir="/tmp")
    assert [latency._module_budget_for(quick, b) for b in (1, 4)] == [latency.QUICK_MODULE_BUDGET[1],
                                                                      latency.QUICK_MODULE_BUDGET[8]]
    help_text = " ".join(latency.BenchConfig.__dataclass_fields__["module_budget"].metadata["help"].split())
    assert f"{one:.0f} at B=1, {above:.0f} above" in help_text


@pytest.mark.parametrize("tool, argv, said", [
    # Each repeat was measured (or printed) twice; latency's per-batch --e2e-budget lost its first value.
    ("latency", ["--batch-sizes", "1", "1", "--e2e-budget", "10", "300"], "--batch-sizes repeats 1"),
    ("latency", ["--sweep-slots", "30", "60", "30"], "--sweep-slots repeats 30"),
    ("op_cpu", ["--batches", "8", "8"], "--batches repeats 8"),
    ("op_cpu", ["--train-batches", "1", "1"], "--train-batches repeats 1"),
    ("serving", ["--batch-sizes", "8", "8"], "--batch-sizes repeats 8"),
    ("budget", ["--batch-sizes", "1", "1"], "--batch-sizes repeats 1"),
    ("bank_dtype", ["--batch-sizes", "8", "8"], "--batch-sizes repeats 8"),
])
def test_repeated_batch_sizes_are_refused_before_the_run(tool, argv, said, no_runs, capsys):
    assert said in _exits_2(tool, argv, capsys)


def test_op_cpu_refuses_a_history_it_could_not_append_to_before_the_run(tmp_path, no_runs, capsys):
    # An unreadable op_cpu.json in --out was read only after the 6-8 min run, which then died and lost its record.
    log = tmp_path / "op_cpu.json"
    for text in ('{"runs": [ {"date": "2026-12-01"', "[1, 2]", '{"runs": 3}'):
        log.write_text(text)
        last = _exits_2("op_cpu", ["--out", str(tmp_path)], capsys)
        assert "--out" in last and "is not an op_cpu history" in last and "give another --out" in last
        assert log.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["op_cpu.json"]


def test_e2e_interval_says_what_it_cannot_read_or_show(tmp_path, capsys):
    from benchmarks import e2e_interval

    not_jsonl = tmp_path / "hostname"
    not_jsonl.write_text("a-machine\n")  # was a JSONDecodeError traceback
    assert "line 1 is not JSON" in _exits_2("e2e_interval", [str(not_jsonl)], capsys)
    path = _e2e_record(tmp_path, "\n\n")
    # No record qualifies: was a silent exit 0 with nothing printed.
    assert "have at most 40 end-to-end rounds; lower --min-rounds" in _exits_2("e2e_interval", [str(path)], capsys)
    assert "no record in" in _exits_2("e2e_interval", [str(path), "--batch", "8"], capsys)
    assert e2e_interval.main([str(path), "--min-rounds", "40"]) == 0 and "40 rounds" in capsys.readouterr().out
