"""``benchmarks.gpu_sweep`` without a GPU: so the one short GPU run does not die on a typo.

- the override hook (``configs.overriding``): unknown fields refused, the table restored after the
  block (also after an exception), and nothing changes outside it;
- the dry run plans every config of the real (ViT-B/16) shapes on meta tensors and every override
  reaches its launch; the run order puts the planner's configs first;
- the bookkeeping of failures (compile error, wrong output, lost override, budget) with stand-in
  launches;
- the whole loop under the Triton interpreter on tiny CPU shapes, in a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_sweep
from mira_kernels.triton import configs

ROOT = Path(__file__).resolve().parents[1]


def test_overriding_is_checked_scoped_and_restored():
    table = configs.fused_config(12608, 2304, 768, torch.bfloat16, "ieee", 197, 8)
    with pytest.raises(ValueError, match="block_q"):
        with configs.overriding(gemm=dict(block_q=1)):
            pass
    with pytest.raises(RuntimeError):
        with configs.overriding(gemm=dict(block_m=64, block_n=32), retrieve=dict(block_k=256), retrieve_split=3,
                                gemm_groups=2):
            cfg = configs.fused_config(12608, 2304, 768, torch.bfloat16, "ieee", 197, 8)
            assert (cfg.block_m, cfg.block_n, cfg.block_k) == (64, 32, table.block_k)
            assert cfg.samples_per_block == configs.samples_per_block(197, 64)
            assert cfg.j_pad == configs.padded(cfg.samples_per_block * 8)
            assert configs.retrieve_config(30, torch.float32).block_k == 256
            assert configs.retrieve_split(1, 96) == 3 and configs.retrieve_split(1, 2) == 2  # at most the chunks
            assert configs.column_groups(4, 36, 64, 16) == 2 and configs.column_groups(4, 1, 64, 16) == 1
            raise RuntimeError("inside")
    assert configs._OVERRIDES == [{}]
    assert configs.fused_config(12608, 2304, 768, torch.bfloat16, "ieee", 197, 8) == table
    assert configs.retrieve_config(30, torch.float32).block_k == 64
    assert configs.retrieve_split(1, 96) == configs.RETRIEVE_PROGRAMS


def test_dry_run_plans_every_config_and_each_override_reaches_its_launch(tmp_path):
    rc = gpu_sweep.main(["--dry-run", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "gpu_sweep.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_sweep.json", "gpu_sweep.txt"]
    assert doc["schema"] == gpu_sweep.SCHEMA and doc["status"] == "ok"
    todo = gpu_sweep.schedule(["bfloat16", "float32"], [1, 8, 64], 197)
    assert len(doc["results"]) == len(todo) and not doc["not_run"]
    assert {r["status"] for r in doc["results"]} <= {"planned", "same_as_planner", "same_as_earlier"}
    assert sum(r["status"] == "planned" for r in doc["results"]) >= 70
    # The planner's configs of every bf16 batch run first.
    assert [(r["batch"], r["variant"]) for r in doc["results"][:9]] == [
        (b, "planner") for b in (1, 8, 64) for _ in range(3)]
    by = {(r["dtype"], r["batch"], r["kernel"], r["variant"]): r for r in doc["results"]}
    planner = by["bfloat16", 1, "retrieve", "planner"]["params"]["retrieve"]
    assert (planner["BLOCK_K"], planner["grid"], planner["num_stages"]) == (64, [1, 64], 2)
    # Below 16 samples: a one-row tile with deferred FMA cosines; "rows16" is the planner before it.
    assert (planner["BLOCK_B"], planner["SCORE_PRECISION"]) == (1, "fma")
    r = by["bfloat16", 1, "retrieve", "rows16"]["params"]["retrieve"]
    assert (r["BLOCK_B"], r["BLOCK_K"], r["SCORE_PRECISION"]) == (16, 64, "tf32x3")
    r = by["bfloat16", 64, "retrieve", "k128-s3"]["params"]["retrieve"]
    assert (r["BLOCK_K"], r["num_stages"], r["grid"][1]) == (128, 3, 16)
    r = by["bfloat16", 8, "retrieve", "f32-split2x"]["params"]["retrieve"]
    assert (r["BLOCK_F"], r["grid"]) == (32, [1, 128])
    r = by["bfloat16", 64, "retrieve", "b64"]["params"]["retrieve"]
    assert (r["BLOCK_B"], r["grid"][0]) == (64, 1)
    g = by["bfloat16", 64, "gemm", "128x128x64-w8s4-all"]["params"]["gemm"]
    assert (g["BLOCK_M"], g["BLOCK_N"], g["num_warps"], g["num_stages"], g["SPB"]) == (128, 128, 8, 4, 2)
    assert (g["GROUPS"], g["TILES"], g["grid"]) == (18, 1, [-(-64 * 197 // 128) * 18])
    g = by["float32", 8, "gemm", "128x64x16-w8s2"]["params"]["gemm"]
    assert (g["BLOCK_M"], g["BLOCK_N"], g["BLOCK_K"], g["num_warps"], g["num_stages"]) == (128, 64, 16, 8, 2)
    g = by["bfloat16", 1, "gemm", "groups-all"]["params"]["gemm"]
    assert (g["GROUPS"], g["TILES"], g["grid"]) == (36, 1, [4 * 36])
    # Diagnostics: the GEMM without an adapter, the shrink in its own launch.
    assert by["bfloat16", 64, "gemm", "no-adapter"]["params"]["gemm"]["LORA"] == 0
    unfolded = by["bfloat16", 64, "pair", "unfolded"]["params"]
    assert set(unfolded) == {"retrieve", "shrink", "gemm"} and unfolded["gemm"]["LORA"] == 2
    assert by["bfloat16", 64, "retrieve", "dk64"]["status"] == "planned"  # not "same_as_planner"
    pair = by["bfloat16", 64, "pair", "planner"]["params"]
    assert pair["gemm"]["USE_PDL"] and pair["gemm"]["LORA"] == 1  # Hopper plan: PDL, shrink folded in
    assert doc["estimate_s"] > 0 and "estimate" in (tmp_path / "gpu_sweep.txt").read_text()
    assert configs._OVERRIDES == [{}]


def test_a_config_that_launches_what_the_planner_or_an_earlier_config_launches_is_not_timed_again(tmp_path):
    rc = gpu_sweep.main(["--dry-run", "--out", str(tmp_path), "--dtypes", "bfloat16", "--batches", "1"])
    assert rc == 0
    doc = json.loads((tmp_path / "gpu_sweep.json").read_text())
    by = {(r["kernel"], r["variant"]): r for r in doc["results"]}
    # At B=1 every column tile is its own program already, so the "all groups" pair is the planner's.
    assert by["pair", "groups-all"]["status"] == "same_as_planner"
    for name in ("s3+groups-all", "s3+64x64x128-w4s3-all"):  # the planner's tile and groups: the s3 pair again
        assert by["pair", name]["status"] == "same_as_earlier" and by["pair", name]["same_as"] == "pair:s3"
    timed = [(r["kernel"], json.dumps(r.get("override", {}).get("problem")), json.dumps(r["params"], sort_keys=True))
             for r in doc["results"] if r["status"] == "planned"]
    assert len(timed) == len(set(timed)) >= 20
    assert "same_as_earlier (pair:s3)" in (tmp_path / "gpu_sweep.txt").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--device", "bogus"], "--device: 'bogus'"), (["--device", "cuda:x"], "--device: 'cuda:x'"),
    (["--batches", "1,8,1"], "--batches repeats 1"), (["--dtypes", "float32,float32"], "--dtypes repeats float32")])
def test_bad_devices_and_repeated_values_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, argv,
                                                                        message):
    monkeypatch.setattr(gpu_sweep, "schedule", lambda *a: pytest.fail("the sweep started"))
    with pytest.raises(SystemExit) as exit_:
        gpu_sweep.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


class _Kernel:
    """Stands in for a Triton kernel: ``kernel[grid](**args)`` calls ``body(args, constexprs)``."""

    def __init__(self, body):
        self.body = body

    def __getitem__(self, grid):
        return lambda **kw: self.body(kw)


def _stub_case(monkeypatch, behaviour: str):
    """A Case whose plans are stand-in launches: ``behaviour`` of the variant's retrieval."""
    from mira_kernels.triton import launchers

    def plan(case, v=None, base=None):
        y = torch.zeros(4)
        a, b = torch.zeros(3), torch.zeros(3)

        def retrieve(kw):
            if v is not None and v.name != "planner":
                if behaviour == "compile":
                    raise RuntimeError("PassManager::run failed\n... out of resource: shared memory")
                if behaviour == "wrong":
                    kw["mixed_a_ptr"].fill_(5.0)
                    return
                if behaviour == "nan":
                    kw["mixed_a_ptr"].fill_(float("nan"))
                    return
            kw["mixed_a_ptr"].fill_(1.0)
            kw["mixed_b_ptr"].fill_(2.0)

        block_k = 64 if behaviour == "lost" else ((v.retrieve or {}).get("block_k", 64) if v else 64)
        launches = [
            launchers.Launch("retrieve", _Kernel(retrieve), (1, 4), dict(mixed_a_ptr=a, mixed_b_ptr=b),
                             dict(BLOCK_B=16, BLOCK_K=block_k, BLOCK_F=64, NC=32)),
            launchers.Launch("gemm", _Kernel(lambda kw: kw["out"].fill_(3.0)), (4,), dict(out=y),
                             dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUPS=1, TILES=1, ORDER=(0,))),
        ]
        return y, launches, dict(split=None, groups=None)

    monkeypatch.setattr(gpu_sweep, "plan", plan)
    case = gpu_sweep.Case("bfloat16", 1, dict(x=torch.ones(1, 2, 3), weight=torch.ones(5, 3), bias=torch.ones(5)),
                          {})
    case.y, case.planner, _ = plan(case)
    for launch in case.planner:
        launch.run()
    return case


@pytest.mark.parametrize("behaviour,status", [("ok", "ok"), ("compile", "compile_error"), ("wrong", "wrong"),
                                              ("nan", "wrong"), ("lost", "override_not_applied")])
def test_failures_are_recorded_not_timed(monkeypatch, behaviour, status):
    case = _stub_case(monkeypatch, behaviour)
    v = gpu_sweep.Variant("retrieve", "k256", 1, retrieve=dict(block_k=256))
    rec = gpu_sweep.run_config(case, v, gpu_sweep.Timer(torch.device("cpu")), lambda: None)
    assert rec["status"] == status, rec
    assert ("warm_us" in rec) == (status == "ok")
    if status == "compile_error":
        assert "shared memory" in rec["error"]
    if status == "override_not_applied":
        assert "block_k=256" in rec["error"]
    same = gpu_sweep.run_config(case, gpu_sweep.Variant("retrieve", "k64", 1, retrieve=dict(block_k=64)),
                                gpu_sweep.Timer(torch.device("cpu")), lambda: None)
    assert same["status"] == "same_as_planner"
    if status != "override_not_applied":  # the same launches once more: recorded, not run nor timed again
        again = gpu_sweep.run_config(case, gpu_sweep.Variant("retrieve", "k256-again", 2, retrieve=dict(block_k=256)),
                                     gpu_sweep.Timer(torch.device("cpu")), lambda: None)
        assert again["status"] == "same_as_earlier" and again["same_as"] == "retrieve:k256", again
        assert "warm_us" not in again and "compile_s" not in again


class _Recorder:
    """A kernel that records the keywords of ``kernel[grid](...)`` and ``kernel.warmup(...)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kw: self.calls.append(("run", grid, kw))

    def warmup(self, *, grid, **kw):
        self.calls.append(("warmup", grid, kw))


@pytest.mark.parametrize("pdl,maxnreg", [(True, 255), (False, None)])
def test_the_compile_ahead_worker_compiles_what_the_run_launches(pdl, maxnreg):
    from mira_kernels.triton import launchers

    kernel = _Recorder()
    launch = launchers.Launch("gemm", kernel, (3, 2), dict(x_ptr=torch.zeros(2), M=7), dict(BLOCK_M=64),
                              num_warps=8, num_stages=3, pdl=pdl, maxnreg=maxnreg)
    launch.run()
    gpu_sweep.precompile(launch)
    (run, g1, kw1), (warm, g2, kw2) = kernel.calls
    assert (run, warm, g1, g2) == ("run", "warmup", (3, 2), (3, 2))
    assert kw1.keys() == kw2.keys() and all(kw1[k] is kw2[k] or kw1[k] == kw2[k] for k in kw1)
    launch.grid = (0, 2)
    gpu_sweep.precompile(launch)  # an empty grid compiles nothing, as run launches nothing
    assert len(kernel.calls) == 2


def test_a_worker_survives_configs_it_cannot_compile(tmp_path, capsys):
    # No GPU and no interpreter here: every warmup fails, and the worker still walks its share.
    rc = gpu_sweep.main(["--worker", "1/3", "--device", "cpu", "--tiny", "--batches", "1", "--dtypes", "bfloat16",
                         "--budget", "30", "--out", str(tmp_path)])
    assert rc == 0 and not list(tmp_path.iterdir())
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["worker"] == 1 and stats["of"] == 3 and stats["compiled"] + stats["failed"] >= 3


def _child(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_sweep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _needs_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
        # Triton 3.6's interpreter cannot run the kernels (a loop bound from a runtime argument fails
        # to convert); requirements.txt pins 3.8 for the interpreter tests.
        pytest.skip(f"the kernels' interpreter runs need Triton >= 3.8, not {triton.__version__}")


def test_the_loop_runs_under_the_interpreter_and_keeps_to_its_budget(tmp_path):
    _needs_interpreter()
    out = tmp_path / "run"
    proc = _child("--device", "cpu", "--tiny", "--batches", "1", "--dtypes", "bfloat16,float32", "--max-configs", "6",
                  "--budget", "60", "--workers", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "gpu_sweep.json").read_text())
    assert doc["status"] == "ok" and len(doc["results"]) == 6
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["status"] for r in doc["results"]} <= {"ok", "same_as_planner"}, [r.get("error") for r in doc["results"]]
    assert len(ok) >= 5 and all(r["rel_err_vs_planner"] <= gpu_sweep.tolerance("bfloat16") for r in ok)
    assert all(r["warm_us"] > 0 and r["linear_warm_us"] > 0 for r in ok)
    assert doc["cases"]["bfloat16 B=1"]["planner_rel_err_vs_float64"] < 1e-2
    assert "pair" in (out / "gpu_sweep.txt").read_text()
    assert {(b["kernel"], b["measure"]) for b in doc["best"]} == {(k, "warm_us") for k in ("pair", "retrieve", "gemm")}
    assert doc["compile_ahead_workers"] == 1 and doc["workers"][0]["rc"] is not None

    out = tmp_path / "none"
    proc = _child("--device", "cpu", "--tiny", "--budget", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "gpu_sweep.json").read_text())
    assert doc["status"] == "timeout" and not doc["results"] and len(doc["not_run"]) > 20


def test_sigterm_keeps_the_results_and_stops_the_workers(tmp_path):
    _needs_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_sweep", "--device", "cpu", "--tiny", "--budget",
                             "120", "--workers", "1", "--dtypes", "float32", "--out", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    doc: dict = {}
    while time.monotonic() < deadline and not doc.get("results"):
        time.sleep(0.2)
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc = json.loads((tmp_path / "gpu_sweep.json").read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    doc = json.loads((tmp_path / "gpu_sweep.json").read_text())
    assert doc["status"] == "interrupted" and doc["results"]
    assert len(doc["workers"]) == 1 and doc["workers"][0]["rc"] is not None


def test_ncu_probe_runs_the_planned_launches_under_the_interpreter():
    _needs_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    argv = ["--device", "cpu", "--tiny", "--batches", "1,3", "--repeats", "1"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ncu_probe", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["bfloat16 B=1", "bfloat16 B=3"]
    assert all("retrieve grid=" in ln and "gemm grid=" in ln for ln in lines)
