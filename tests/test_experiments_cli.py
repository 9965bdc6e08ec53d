"""CI smoke run of ``python -m mira.experiments all --quick`` from a clean cache: loose sanity only.

The quick mode pre-trains its own backbone (CI starts clean), runs every protocol and every kind
and option of the tables for one seed on tiny data, and writes to a scratch folder, never to
``results/``. Assertions are deliberately loose (finite, in range, better than chance where the
quick schedule can be); the recorded tables come from full runs. The tests of this module share
one experiments cache: the first run pre-trains the quick backbone (the clean-start path), the
conflict control's run loads it (the cached path), as a second local run would.
"""

import json
import math
import os
import shutil

import pytest

from mira.experiments import __main__ as cli
from mira.experiments import report
from mira.experiments.recipe import PRESETS, preset

CHANCE = 0.1


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, idigits_cache):
    """An experiments cache holding only the built domains, shared by this module's runs."""
    cache = tmp_path_factory.mktemp("cli-cache")
    shutil.copy(idigits_cache, cache / idigits_cache.name)
    return cache


def _backbone_files(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("digits_vit_"))


@pytest.mark.filterwarnings("ignore")
def test_quick_mode_end_to_end(tmp_path, monkeypatch, shared_cache):
    monkeypatch.chdir(tmp_path)  # a run without --record must not write under ./results
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(shared_cache))
    had_backbone = bool(_backbone_files(shared_cache))
    doc = cli.main(["all", "--quick", "--no-progress"])
    out = shared_cache / "runs" / "idigits-quick"
    assert not (tmp_path / "results").exists()
    # Run first (file order, as in CI), this pre-trains the backbone and caches it for the next run.
    assert doc["backbone"]["cached"] == had_backbone and len(_backbone_files(shared_cache)) == 1
    assert (out / "retrieval_weights.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| mira |" in table and "| improved |" in table and "| shared head: oracle |" in table
    assert set(doc["results"]["dg"]["runs"]) == set(cli.QUICK_DG_ROWS)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary_mean_std"].keys() == {"dil", "cil", "dg"}
    assert on_disk["recipes"]["base"]["key_norm"] == "per_feature"

    for setting in ("dil", "cil"):
        runs = doc["results"][setting]["runs"]
        assert set(runs) == set(cli.QUICK_ROWS if setting == "dil" else cli.QUICK_CIL_ROWS)
        for variant, rs in runs.items():
            for r in rs:
                assert all(math.isfinite(a) and 0 <= a <= 1 for a in r["final_row"]), (setting, variant)
                if "probe" in r:
                    assert 0 <= r["probe"] <= 1
        best = max(r["avg_acc"] for rs in runs.values() for r in rs)
        assert best > 2 * CHANCE, (setting, best)
    # The first task (mnist, the backbone's own style) is read well through the shared head, also
    # on quick mode's tiny schedule; the fresh heads of the faithful rows barely train there.
    assert doc["results"]["dil"]["runs"]["improved"][0]["acc"][0][0] > 3 * CHANCE
    dg = doc["results"]["dg"]["runs"]
    assert all(math.isfinite(r["held_out_acc"]) for rs in dg.values() for r in rs)
    prof = doc["dil_retrieval_profile_seed0"]["mira"]
    assert all(math.isfinite(w) for block in prof for row in block for w in row)

    # Runs of single seeds merge into one table (the recorded tables are made that way).
    other = tmp_path / "seed5"
    other.mkdir()
    as_seed5 = json.loads(json.dumps(on_disk).replace('"seed": 0', '"seed": 5'))
    as_seed5["seeds"] = [5]
    (other / "results.json").write_text(json.dumps(as_seed5))
    merged = report.merge([str(out), str(other)], str(tmp_path / "merged"), "merge")
    assert merged["seeds"] == [0, 5] and len(merged["parts"]) == 2
    assert len(merged["results"]["dil"]["runs"]["mira"]) == 2
    assert "| mira |" in (tmp_path / "merged" / "results.md").read_text()
    with pytest.raises(ValueError, match="share seeds"):
        report.merge([str(out), str(out)], str(tmp_path / "bad"), "merge")

    # --record puts another preset's runs beside the default preset's tables, never over them.
    paper = tmp_path / "paper"
    paper.mkdir()
    # (as a full run's: --record refuses a quick part, tests/test_experiments_report.py)
    (paper / "results.json").write_text(json.dumps(dict(on_disk, preset="paper", mode="full")))
    report.main(["--record", str(paper)])
    recorded = tmp_path / "results" / "experiments"
    assert sorted(os.listdir(recorded)) == ["idigits-paper"]
    assert "preset paper" in (recorded / "idigits-paper" / "results.md").read_text()


def test_adapter_copies_follow_the_preset():
    cfg = cli.P.ProtocolConfig(recipe=preset("default"), cil_adapters_per_task=2)
    assert [cli.adapter_copies(preset(p), cfg, cil) for p in ("default", "paper") for cil in (False, True)] == \
        [1, 2, 10, 10]


@pytest.mark.filterwarnings("ignore")
def test_conflict_control_reports_the_cue_blind_bound(tmp_path, monkeypatch, shared_cache):
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(shared_cache))
    out = tmp_path / "out"
    doc = cli.main(["dil", "--suite", "conflict", "--quick", "--no-progress", "--out", str(out),
                    "--variants", "no adapters", "oracle", "improved"])
    runs = doc["results"]["dil"]["runs"]
    assert set(runs) == {"no adapters", "oracle", "improved"}
    agree = runs["no adapters"][0]["cue_blind_agreement"]
    assert 0 <= agree <= 1 and "cue_blind_agreement" not in runs["oracle"][0]
    # The bound the table states: a model giving both images of a pair the same class is wrong on one.
    final = runs["no adapters"][0]["final_row"]
    assert sum(final) / 2 <= 1 - agree / 2 + 1e-9
    assert "cue-blind pairs" in (out / "results.md").read_text()
    assert os.path.exists(out / "results.json")



@pytest.mark.parametrize(
    "args, msg",
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--threads", "-3"], "--threads must be >= 1"),
        (["--dist-timeout", "inf"], "--dist-timeout must be"),
        (["--dist-timeout", "1e300"], "--dist-timeout must be"),
        (["--seeds", "0", "1", "0"], "--seeds repeats"),
        (["--seeds", str(2 ** 70)], "--seeds must be"),
        (["--out", "{file}"], "--out"),
        (["--out", "{file}/sub"], "--out"),
        (["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
        # torch's CPU generator keeps a seed's low 32 bits: -1 and 2**32 - 1, 0 and 2**32 are one run each.
        (["--seeds", "-1"], "--seeds must be"),
        (["--seeds", "0", str(2 ** 32)], "--seeds must be"),
        # Folders that exist or not but cannot be written (root ignores permission bits; /proc refuses it).
        (["--checkpoint-dir", "/proc"], "--checkpoint-dir /proc: cannot write"),
        (["--checkpoint-dir", "/proc/ckpt"], "--checkpoint-dir /proc/ckpt: cannot write"),
        (["--out", "/proc"], "--out /proc: cannot write"),
        (["--checkpoint-dir", ""], "--checkpoint-dir must not be empty"),
        (["--out", ""], "--out must not be empty"),
        (["--record"], "--record writes the full run's tables; not with --quick"),
        (["--table", "ablations", "--variants", "oracle", "mira, relu"], "no rows named ['oracle'] in the ablations"),
        # A traceback: the improved preset routes, and the row "mira, block 0 off" cannot (first_block="off").
        (["--preset", "improved", "--table", "ablations"], "--table ablations --preset improved: the ablation table"),
        (["--preset", "improved", "--table", "ablations", "--variants", "improved"], "routing='supervised'"),
    ],
    ids=["threads-0", "threads-negative", "timeout-inf", "timeout-huge", "seeds-repeated", "seed-huge",
         "out-file", "out-under-file", "checkpoint-dir-file", "seed-negative", "seed-2**32", "checkpoint-dir-proc",
         "checkpoint-dir-under-proc", "out-proc", "checkpoint-dir-empty", "out-empty", "record-quick",
         "variant-of-another-table", "ablations-of-a-routing-preset", "ablations-of-a-routing-preset-one-row"],
)
def test_bad_options_are_one_line_usage_errors_before_any_work(args, msg, tmp_path, monkeypatch, capsys):
    # As argparse's own errors: exit status 2 and one line naming the option, not a traceback after the
    # backbone's pre-training (--seeds 0 0 ran seed 0 twice and reported its "± 0.0" as two seeds'; a
    # --checkpoint-dir that is a file failed after the first task was trained).
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))  # nothing may be built there
    # --record writes relative to the working directory: a case the CLI failed to refuse would
    # otherwise overwrite the repository's recorded results (it did, before --record --quick was refused).
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["dil", "--quick", "--no-progress", *(a.format(file=file) for a in args)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m mira.experiments: error: ") and msg in err, err
    assert not (tmp_path / "cache").exists() and file.read_text() == "x"


def test_an_unknown_variant_is_refused_before_the_backbone_is_pre_trained(tmp_path, monkeypatch, capsys):
    # It was refused only after _load_backbone: minutes of pre-training on a clean cache, then exit 2.
    from tests.experiments_tiny import tiny_suite

    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    with tiny_suite(), pytest.raises(SystemExit) as exc:
        cli.main(["dil", "--suite", "tiny", "--quick", "--no-progress", "--out", str(tmp_path / "out"),
                  "--variants", "mira", "miraa"])
    assert exc.value.code == 2
    assert "no rows named ['miraa'] in the main table of suite 'tiny'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def _usage_error(capsys, *argv) -> str:
    """The one line of a refused command line (exit status 2, as argparse's own errors)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unwritable_cache_and_a_folder_in_place_of_a_checkpoint_are_usage_errors(tmp_path, monkeypatch, capsys):
    # Both failed as tracebacks: the cache (a file) as FileExistsError, the checkpoint folder as "No such
    # device (os error 19)" after the backbone's pre-training.
    file = tmp_path / "file"
    file.write_text("x")
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(file))
    err = _usage_error(capsys, "dil", "--quick", "--no-progress", "--out", str(tmp_path / "out"))
    assert f"MIRA_EXPERIMENTS_CACHE={file}: cannot write" in err and file.read_text() == "x"
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "idigits-default-seed0-dil-mira-quick.safetensors").mkdir(parents=True)
    err = _usage_error(capsys, "dil", "--quick", "--no-progress", "--checkpoint-dir", str(ckpt))
    assert "idigits-default-seed0-dil-mira-quick.safetensors is a folder, not a checkpoint file" in err
    assert not (tmp_path / "cache" / "runs").exists()


def test_an_unreadable_checkpoint_file_is_a_usage_error_naming_it(tmp_path, monkeypatch, capsys):
    # An empty file failed as a traceback ("header too small") when its row's turn came: after the
    # backbone's pre-training, the adaptation pool and every earlier row.
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "idigits-default-seed0-dil-mira-quick.safetensors").write_bytes(b"")
    err = _usage_error(capsys, "dil", "--quick", "--no-progress", "--checkpoint-dir", str(ckpt))
    assert "idigits-default-seed0-dil-mira-quick.safetensors is not a readable checkpoint" in err, err
    assert not (tmp_path / "cache" / "runs").exists()


@pytest.mark.filterwarnings("ignore")
def test_a_command_line_run_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    # The checkpoint identity holds fingerprints of the data, backbone and adaptation pool: the same command
    # line rebuilds them bit for bit (the backbone pre-trained by the first run, loaded from the cache by the
    # second; the pool trained again), so every finished row resumes instead of being refused.
    from tests.experiments_tiny import tiny_suite

    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    argv = ["dil", "--suite", "tiny", "--quick", "--no-progress", "--variants", "mira", "sequential LoRA",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--out"]
    with tiny_suite():
        first = cli.main(argv + [str(tmp_path / "first")])
        trained = []
        for name in ("consolidate", "train_lora"):
            real = getattr(cli.P, name)
            monkeypatch.setattr(cli.P, name, lambda *a, _real=real, **k: trained.append(1) or _real(*a, **k))
        again = cli.main(argv + [str(tmp_path / "again")])
    assert not first["backbone"]["cached"] and again["backbone"]["cached"]
    assert trained == []  # no task trained again
    assert json.dumps(again["results"], sort_keys=True) == json.dumps(first["results"], sort_keys=True)


def test_a_table_without_rows_is_refused_and_quick_ablations_run_each_option(tmp_path, monkeypatch, capsys):
    # dg --table ablations pre-trained the backbone and wrote empty tables (exit 0); --quick --table
    # ablations kept the main table's quick rows, none of which is in the ablation table: nothing ran.
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    err = _usage_error(capsys, "dg", "--quick", "--no-progress", "--table", "ablations")
    assert "the ablations table has no rows for dg" in err and not (tmp_path / "cache").exists()
    base, improved = preset("default"), preset("improved")
    full = cli.rows_to_run("ablations", base, improved, ("dil", "cil"))
    quick = cli.rows_to_run("ablations", base, improved, ("dil", "cil"), quick=True)
    for setting in ("dil", "cil"):
        assert quick[setting] and {v.name for v in quick[setting]} <= {v.name for v in full[setting]}
        # every option the table varies is run once (the 10-epoch rows differ only in a schedule)
        varied = {(f, getattr(v.recipe, f)) for v in full[setting] for f in ("first_block", "query_token",
                                                                               "query_source", "separation")}
        assert varied == {(f, val) for v in quick[setting] for f, val in varied if getattr(v.recipe, f) == val}


def test_the_ablation_rows_build_for_every_preset_without_a_routing_penalty():
    # --preset improved --table ablations built base.replace(first_block="off") from a routing recipe: a
    # traceback (RecipeConfig refuses the pair). Rows only, no training.
    for name, recipe in PRESETS.items():
        if recipe.routing == "none":
            rows = cli.rows_to_run("ablations", preset(name), preset("improved"), ("dil", "cil"))
            assert [v.name for v in rows["dil"]] == [v.name for v in rows["cil"]] and len(rows["dil"]) == 19
            (off,) = [v for v in rows["dil"] if v.recipe.first_block == "off"]
            assert off.recipe == preset(name, first_block="off")  # one change from the row "mira"
        else:
            with pytest.raises(ValueError, match="one cause at a time"):
                cli.rows_to_run("ablations", preset(name), preset("improved"), ("dil",))


def test_write_removes_a_stale_retrieval_plot(tmp_path):
    # A reused --out folder kept the previous run's retrieval_weights.png beside this run's tables.
    stale = tmp_path / "retrieval_weights.png"
    stale.write_bytes(b"png of another run")
    doc = {"command": "c", "suite": "tiny", "preset": "default", "seeds": [0], "elapsed_seconds": 1.0,
           "cpu_seconds": 1.0, "machine": {"loadavg_start": [0.0], "cpu": "cpu", "cpus": 1, "torch_threads": 1},
           "results": {"cil": {"runs": {}, "tasks": []}}, "row_order": {"cil": []}, "dil_retrieval_profile_seed0": {}}
    report.write(doc, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_every_option_states_its_default():
    for action in cli.build_parser()._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings or action.dest
    text = " ".join(a.help for a in cli.build_parser()._actions)
    assert "$MIRA_EXPERIMENTS_CACHE/runs/<suite>[-<preset>][-ablations][-quick]" in text
    assert "results/experiments/<suite>[-<preset>][-ablations]/" in text
    assert "3 domains" not in text  # the conflict suite's quick run has 2
    assert all(a.help for a in report.build_parser()._actions)


@pytest.mark.parametrize("part", ["missing", "empty"])
def test_report_refuses_a_part_without_results_as_a_usage_error(part, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / part), "--out", str(tmp_path / "merged")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m mira.experiments.report: error: ") and "results.json" in err, err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty"), "--out", ""])
    assert "--out must not be empty" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
def test_the_retrieval_profile_records_and_is_titled_by_the_seed_it_is_of(tmp_path, monkeypatch):
    # --seeds 2 1 profiled seeds[0] = 2, and the plot was titled min(seeds) = 1.
    from tests.experiments_tiny import tiny_suite

    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(tmp_path / "cache"))
    titled = []
    monkeypatch.setattr(report, "plot_profiles", lambda *args: titled.append(args[-1]))
    with tiny_suite():
        doc = cli.main(["dil", "--suite", "tiny", "--quick", "--no-progress", "--seeds", "2", "1",
                        "--variants", "mira", "--out", str(tmp_path / "out")])
    assert doc["dil_retrieval_profile_seed0"]["mira"] and doc["dil_retrieval_profile_seed"] == 2
    assert titled == [2]
