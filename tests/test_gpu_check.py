"""``make gpu-check`` (benchmarks/gpu_check.py) without a GPU: what can be checked before the GPU exists.

- the dry run plans every phase, writes the documented JSON and exits 0 on a CPU machine;
- a real run on this machine (every phase skipped but env) writes nothing into tracked files;
- the op and model phases' whole logic runs on CPU tensors with tiny shapes (the CPU and
  reference backends stand in for the GPU ones), and its records match the schema;
- the build tree mirrors the sources (same digest), the pytest result parsers, the time limit
  that ends a phase's whole process group, and ``--record`` naming machine, versions, commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")  # pinned in requirements.txt; present wherever `make test` runs

from benchmarks import _gpu_check_phases as phases  # noqa: E402
from benchmarks import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(gpu_check.SCHEMA_FILE.read_text())
TINY = dict(gpu_check.WORKLOAD, tokens=5, d_in=16, d_out=48, slice_offsets=[0, 32], slots=3, batches=[1, 2],
            dtypes=["float32", "bfloat16"], train_batch=2, max_rounds=3,
            model_kwargs=dict(img_size=32, embed_dim=32, depth=2, num_heads=2))


def _validate(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out"), "--work",
           str(tmp_path / "work"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tracked_state() -> tuple[dict, str]:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    stat = {}
    for name in filter(None, files.stdout.split("\0")):
        path = ROOT / name
        if path.exists():
            st = path.stat()
            stat[name] = (st.st_mtime_ns, st.st_size)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return stat, status


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """One dry run and one real run on this (GPU-less) machine, with the checkout's state around them."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("the checkout is not a git repository")
    before = _tracked_state()
    dry_dir, real_dir = tmp_path_factory.mktemp("dry"), tmp_path_factory.mktemp("real")
    # Side by side (each mostly imports torch): a loaded CPU can take 10 s to probe, hence the budget.
    dry, real = _start(dry_dir, "--dry-run"), _start(real_dir, "--budget", "600")
    dry, real = _finish(dry), _finish(real)
    after = _tracked_state()
    return {"dry": (dry, dry_dir / "out"), "real": (real, real_dir / "out"), "before": before, "after": after}


def test_dry_run_plans_every_phase_writes_the_schema_and_exits_0(cpu_runs):
    proc, out = cpu_runs["dry"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    _validate(doc)
    assert doc["mode"] == "dry-run" and doc["exit_status"] == 0 and doc["finished"]
    assert doc["environment"]["torch"] and doc["environment"]["versions"]["torch"]
    assert all(err is None for err in doc["environment"]["imports"].values()), doc["environment"]["imports"]
    phases_ = doc["phases"]
    assert list(phases_) == list(gpu_check.PHASES) and phases_["env"]["status"] == "ok"
    for name in gpu_check.PHASES[1:]:
        ph = phases_[name]
        assert ph["plan"]["does"], name
        assert ph["status"] in ("planned", "skipped"), (name, ph)
        assert ph["status"] == "planned" or ph["reason"], (name, ph)  # a skip always says why
        assert ph["seconds"] is None  # nothing ran
    if doc["environment"]["gpu"] is None:
        assert "no CUDA device" in phases_["build"]["reason"]
    assert len(phases_["op"]["plan"]["cells"]) == 10 and len(phases_["model"]["plan"]["cells"]) == 8
    summary = (out / "summary.txt").read_text()
    assert "phase" in summary and "dry-run" in summary and summary in proc.stdout
    assert {p.name for p in out.iterdir()} <= set(gpu_check.OUTPUT_FILES)


def test_a_real_run_without_gpu_reports_why_and_writes_nothing_into_the_checkout(cpu_runs):
    proc, out = cpu_runs["real"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    _validate(doc)
    assert doc["mode"] == "run" and doc["source"]["digest"] == gpu_check.source_digest()[0]
    if doc["environment"]["gpu"] is None:
        assert [doc["phases"][p]["status"] for p in gpu_check.PHASES] == ["ok"] + ["skipped"] * 4
    # Neither run touched a tracked file or left an untracked one outside git's ignore rules.
    assert cpu_runs["after"] == cpu_runs["before"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and set(files) <= set(gpu_check.OUTPUT_FILES)


def test_op_phase_logic_on_cpu_tensors_matches_the_schema(tmp_path):
    rec = phases.Partial(tmp_path / "op.json")
    phases.run_op(rec, time.monotonic() + 120, dict(TINY, batches=[2]), device="cpu")
    data = rec.data
    assert data["status"] == "ok" and not data["not_measured"]
    assert "triton" in data["excluded"] and "cuda" in data["excluded"]  # with the router's reasons
    assert "CUDA" in data["excluded"]["probe"]  # benchmarks.gemm_probe: TMA needs an sm_90 device
    assert "CUDA" in data["excluded"]["triton+tma"]  # and so does the triton backend's TMA main loop
    assert data["variants"][:2] == ["linear", "eager"] and "mira[reference]" in data["variants"]
    assert not any(v.startswith(("probe[", "mira[triton+")) for v in data["variants"])
    rows = data["measurements"]
    cells = {(r["mode"], r["dtype"], r["batch"]) for r in rows}
    assert len(cells) == 4 and len(rows) == 4 * len(data["variants"])
    for r in rows:
        assert r["ok"] and r["error"] is None and r["check"]["finite"], r
        assert r["eager_us"]["median"] > 0 and r["eager_us"]["rounds"] >= 1
        assert r["graph_error"].startswith("CUDA graphs need a CUDA device")
        if r["kind"] == "mira":  # the backends are as accurate as PyTorch (the eager baseline, in bf16, is not)
            assert r["check"]["rel_err"] < 3 * r["check"]["pytorch_rel_err"] + 1e-6, r
        if r["variant"] != "linear":
            assert r["vs_baseline"]["eager"]["ratio"] > 0
    doc = _document_with({"op": dict(data, status="ok", reason=None, seconds=1.0, budget_s=2.0)})
    _validate(doc)
    assert "mira[reference]" in gpu_check.render_summary(doc)
    # On an sm_90 GPU the 16-bit cells also carry benchmarks.gemm_probe's rows: the schema and the
    # summary take them (a probe row is a plain projection, kind "probe", beside "linear").
    probe = "probe[128x256x64-w8s3]"
    rows = [dict(r, variant=probe, kind="probe") for r in rows if r["variant"] == "linear"]
    doc["phases"]["op"] = dict(doc["phases"]["op"], variants=[*data["variants"], probe],
                               measurements=data["measurements"] + rows)
    _validate(doc)
    assert probe in gpu_check.render_summary(doc)
    # ... and the triton backend's TMA variant: a MIRA row (kind mira, backend triton) of its own name.
    tma = [dict(r, variant="mira[triton+tma]", backend="triton") for r in data["measurements"] if r["kind"] == "mira"]
    doc["phases"]["op"] = dict(doc["phases"]["op"], variants=[*doc["phases"]["op"]["variants"], "mira[triton+tma]"],
                               measurements=doc["phases"]["op"]["measurements"] + tma)
    _validate(doc)
    assert "mira[triton+tma]" in gpu_check.render_summary(doc)


def test_model_phase_logic_on_a_tiny_vit_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import mira_kernels

    # The record says which path the keys take (mira.memory._fused_key_norm_applies on them), not whether
    # the Triton helpers are there: with helpers claimed, CPU keys still take _unit_columns (recorded
    # 'fused' before, whatever the keys).
    monkeypatch.setattr(mira_kernels.backends, "fused_helpers_available", lambda device: True)
    rec = phases.Partial(tmp_path / "model.json")
    workload = dict(TINY, batches=[2], dtypes=["float32"])
    phases.run_model(rec, time.monotonic() + 120, workload, device="cpu")
    data = rec.data
    assert data["status"] == "ok"
    # benchmarks/gpu_model.py prices the run with it (as_run).
    assert data["layer"] == {"key_norm_by_dtype": {"float32": "aten"},
                             "memory_dtypes": {"float32": {"keys": "float32", "banks": "float32"}}}
    rows = {r["variant"]: r for r in data["measurements"]}
    assert set(rows) == set(data["variants"]) and "stock" in rows and "eager" in rows
    for name, r in rows.items():
        assert r["ok"] and r["eager_us"]["median"] > 0, r
        if name.startswith("mira["):
            # MIRA on a backend computes what the eager baseline computes (fp32 rounding apart).
            assert r["check"]["rel_err"] < 1e-5, r
    _validate(_document_with({"model": dict(data, status="ok", reason=None, seconds=1.0, budget_s=2.0)}))


def test_layer_record_is_what_the_keys_take_per_dtype(monkeypatch):
    # One model phase builds a model per dtype, and the path depends on the keys (their dtype, device):
    # each dtype's record asks mira.memory._fused_key_norm_applies about that dtype's keys.
    torch = pytest.importorskip("torch")
    from mira import AdapterMemory, MemoryConfig
    from mira import memory as mira_memory

    monkeypatch.setattr(mira_memory, "_fused_key_norm_applies", lambda keys: keys.dtype == torch.float32)
    config = MemoryConfig(d_in=8, d_k=8, num_slices=2, slice_width=8, rank=2)
    for dtype, path in ((torch.float32, "fused"), (torch.bfloat16, "aten")):
        memories = [AdapterMemory(config, dtype=dtype) for _ in range(2)]
        name = str(dtype).removeprefix("torch.")
        assert phases._layer_record(memories) == {"key_norm": path, "keys": name, "banks": name}
    banks32 = AdapterMemory(MemoryConfig(d_in=8, d_k=8, num_slices=2, slice_width=8, rank=2, bank_dtype="float32"),
                            dtype=torch.bfloat16)
    assert phases._layer_record([banks32]) == {"key_norm": "aten", "keys": "bfloat16", "banks": "float32"}


def _document_with(phase_records: dict) -> dict:
    args = gpu_check.parse_args(["--dry-run"])
    doc = gpu_check.new_document(args, list(gpu_check.PHASES), args.workload)
    doc["mode"] = "run"
    for name, record in phase_records.items():
        doc["phases"][name] = record
    return doc


@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "29.5", "x"])
def test_a_budget_that_is_not_a_finite_30_s_or_more_is_a_usage_error(budget, tmp_path, capsys):
    # NaN passed `budget < 30` and cut every phase to a 5 s limit (and wrote NaN into gpu_check.json);
    # inf - elapsed is inf, and inf - inf is NaN again in the later phases' shares.
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--dry-run", "--budget", budget, "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / "work")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--budget" in err[-1] and "Traceback" not in err[-1]
    assert gpu_check.parse_args(["--dry-run", "--budget", "30", "--out", str(tmp_path / "out"),
                                 "--work", str(tmp_path / "work")]).budget == 30.0


@pytest.mark.parametrize("argv,message", [
    (["--arch", "xyz"], "--arch 'xyz': not a compute capability"),  # was a failed build on the GPU machine
    (["--arch", "sm_90"], "not a compute capability: 'sm_90'"),
    (["--arch", "8.0;9.0+ptx"], "not a compute capability: '9.0+ptx'"),
    (["--dry-run", "--record"], "--record: a --dry-run has nothing to record"),  # was silently ignored
])
def test_a_bad_arch_list_or_a_record_of_a_dry_run_is_a_usage_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args([*argv, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["9.0", "9.0a", "8.0;9.0+PTX", "8.0 8.6", "10.0a+PTX", "Hopper", "Ampere+Tegra"])
def test_every_torch_cuda_arch_list_form_is_taken(arch, tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--arch", arch, "--out", str(tmp_path / "o"), "--work", str(tmp_path)])
    assert args.arch == arch


def test_schema_rejects_what_readers_could_not_use():
    doc = _document_with({})
    _validate(doc)
    for broken in ({"schema": "mira-gpu-check/0"}, {"mode": "test"}, {"phases": {}}):
        with pytest.raises(jsonschema.ValidationError):
            _validate({**doc, **broken})
    bad_status = json.loads(json.dumps(doc))
    bad_status["phases"]["op"]["status"] = "done"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad_status)


def test_build_tree_mirrors_the_sources_and_keeps_its_build_folder(tmp_path):
    tree = tmp_path / "tree"
    (tree / "build").mkdir(parents=True)
    (tree / "build" / "keep.o").write_text("object")
    (tree / "mira_kernels").mkdir()
    (tree / "mira_kernels" / "deleted_upstream.py").write_text("stale")
    count = gpu_check.sync_tree(ROOT, tree)
    digest, files = gpu_check.source_digest(ROOT)
    assert count == files and gpu_check.source_digest(tree) == (digest, files)
    assert (tree / "build" / "keep.o").exists() and not (tree / "mira_kernels" / "deleted_upstream.py").exists()
    assert (tree / "setup.py").stat().st_mtime_ns == (ROOT / "setup.py").stat().st_mtime_ns  # ninja sees no change


def test_phase_time_limit_ends_the_whole_process_group(tmp_path):
    # A child that starts a grandchild and both sleep: the limit must end both, promptly.
    marker = tmp_path / "grandchild.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    rc, timed_out = gpu_check.run_logged([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ),
                                         timeout=2.0, log=tmp_path / "log", title="sleeper")
    assert timed_out and time.monotonic() - t0 < 15
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
    assert "killed at its time limit" in (tmp_path / "log").read_text()


def _running(pid: int) -> bool:
    # Gone, or a zombie (dead, not yet reaped by whoever adopted it), counts as ended.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_pytest_results_are_read_from_junit_xml_and_from_a_killed_run_log(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no device')\ndef test_skip(): pass\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfail(): assert False\n"
    )
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "test_sample.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    parsed = gpu_check.parse_junit(junit)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "xfailed": 1, "xpassed": 0}
    assert parsed["failures"][0]["test"].endswith("::test_bad") and "one is not two" in parsed["failures"][0]["message"]
    assert parsed["skip_reasons"] == {"no device": 1}
    # Verbose lines as pytest prints them, with and without pytest-xdist's worker prefix.
    log = proc.stdout.replace("test_sample.py", "tests/test_sample.py") + (
        "[gw1] [ 50%] PASSED tests/test_x.py::test_a[float32]\n[gw0] [100%] FAILED tests/test_x.py::test_b\n")
    counts = gpu_check.parse_pytest_log(log)["counts"]
    assert counts["passed"] == 2 and counts["failed"] == 2 and counts["skipped"] == 1 and counts["xfailed"] == 1


def test_record_names_machine_driver_versions_and_commit(tmp_path, monkeypatch):
    doc = _document_with({})
    doc["environment"] = {"gpu": {"name": "NVIDIA H200", "capability": "9.0", "sms": 132, "memory_gib": 139.8,
                                  "driver": "580.159.04"}, "versions": {"torch": "2.11.0", "triton": "3.6.0"},
                          "torch_cuda": "13.0", "python": "3.12.3", "cpu": "x", "cpu_count": 16}
    doc["source"] = {"commit": None, "dirty": None, "digest": "ab" * 32, "files": 3}
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu_check.json").write_text(json.dumps(doc))
    (results / "summary.txt").write_text("table\n")
    monkeypatch.setattr(gpu_check, "source_identity",
                        lambda repo=None: {"commit": "c0ffee" * 6 + "abcd", "dirty": False, "digest": "ab" * 32})
    dest = gpu_check.record(results, dest_root=tmp_path / "gpu")
    assert dest.name == f"{doc['started'][:10]}_nvidia-h200_c0ffeec0ffe"
    text = (dest / "record.txt").read_text()
    for fact in ("NVIDIA H200", "580.159.04", "torch: 2.11.0", "triton: 3.6.0", "c0ffee", "matched"):
        assert fact in text, fact
    assert (dest / "summary.txt").read_text() == "table\n"
    doc["mode"] = "dry-run"
    (results / "gpu_check.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="dry run"):
        gpu_check.record(results, dest_root=tmp_path / "gpu")


def test_budget_shares_fit_five_minutes_and_the_makefile_target_runs_the_script():
    assert sum(gpu_check.BUDGET_SHARES.values()) <= gpu_check.TOTAL_BUDGET_S <= 300
    make = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_ARGS=--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert make.returncode == 0 and "-m benchmarks.gpu_check --dry-run" in make.stdout


def test_failing_and_non_finite_variants_are_recorded_not_timed(tmp_path):
    import math

    import torch

    from benchmarks.latency import DeviceTimer

    rec = phases.Partial(tmp_path / "cell.json")
    fns = {"linear": lambda: torch.ones(4).sum(), "mira[nan]": lambda: torch.ones(4).sum(),
           "mira[raises]": lambda: torch.ones(4).sum()}
    nan_check = {"against": "x", "rel_err": math.inf, "pytorch_rel_err": 1e-7}
    checks = {"linear": {"rel_err": 0.0, "check": {"against": "x", "rel_err": 0.0, "pytorch_rel_err": 0.0}},
              "mira[nan]": {"rel_err": math.inf, "check": nan_check},
              "mira[raises]": {"error": "RuntimeError: no kernel image", "check": None}}
    kinds = {"linear": ("linear", None), "mira[nan]": ("mira", "nan"), "mira[raises]": ("mira", "raises")}
    phases._measure(rec, mode="forward", dtype_name="float32", batch=1, variants=fns, checks=checks,
                    baseline="linear", kinds=kinds, budget=1.0, profile=True, timer=DeviceTimer(torch.device("cpu")),
                    device=torch.device("cpu"), max_rounds=3)
    rows = {r["variant"]: r for r in rec.data["measurements"]}
    assert rows["linear"]["ok"] and rows["linear"]["check"]["finite"]
    nan = rows["mira[nan]"]
    assert not nan["ok"] and nan["check"] == dict(nan_check, rel_err=None, finite=False)
    raised = rows["mira[raises]"]
    assert not raised["ok"] and raised["error"] and raised["eager_us"] is None and raised["kernels"] is None
    json.loads(json.dumps(rec.data, allow_nan=False))  # strict JSON: no inf or NaN anywhere
    doc = _document_with({"op": dict(rec.data, status="ok", reason=None, seconds=1.0, budget_s=2.0)})
    _validate(doc)
    summary = gpu_check.render_summary(doc)
    assert "WRONG (inf/NaN)" in summary and "ERROR" in summary and "no kernel image" in summary


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_model_check_can_fail_and_is_well_conditioned_in_16_bit(dtype_name):
    # The H200 run of 2026-12-04 reported every backend WRONG in bf16 at B >= 8 (rel err 0.6-1 vs
    # the eager baseline) because random keys made the affine weights ill-conditioned. With keys
    # near the blocks' queries, MIRA's backends agree with the eager baseline to bf16's noise, and
    # a model without the adapters (stock) is far from it, so the check can fail.
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    dtype = getattr(torch, dtype_name)
    models, size, channels, layer = phases._vit_variants(dict(TINY, dtypes=[dtype_name]), dtype,
                                                         torch.device("cpu"), ["reference", "cpu"])
    # attach makes the memory in the model's dtype; CPU keys take mira.memory._unit_columns.
    assert layer == {"key_norm": "aten", "keys": dtype_name, "banks": dtype_name}
    images = torch.randn(8, channels, *size, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        out = {name: model(images) for name, model in models.items()}
    assert phases._rel_err(out["stock"], out["eager"]) > 2 * phases.GROSS_REL_ERR
    for name in ("mira[reference]", "mira[cpu]"):
        assert phases._rel_err(out[name], out["eager"]) < phases.GROSS_REL_ERR / 2, name


def test_a_recorded_run_with_a_model_phase_gets_the_calibrated_model_beside_it(tmp_path, monkeypatch):
    pytest.importorskip("triton")  # the model prices the Triton backend's launch plans
    run = next(ROOT.glob("benchmarks/results/gpu/*9c67b4a*/gpu_check.json"))
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(run, results / "gpu_check.json")
    monkeypatch.setattr(gpu_check, "source_identity", lambda repo=None: {"commit": None, "dirty": None, "digest": ""})
    dest = gpu_check.record(results, dest_root=tmp_path / "gpu")
    text = (dest / "model_vs_measured.txt").read_text()
    assert text.startswith("MODEL, NOT A MEASUREMENT") and f"Calibrated to this run ({dest.name})" in text
    assert "cells not fitted: median" in text and "model_vs_measured.txt" in (dest / "record.txt").read_text()
    # A run without a model phase gets no model file.
    doc = json.loads(run.read_text())
    doc["phases"]["model"] = {"status": "skipped"}
    (results / "gpu_check.json").write_text(json.dumps(doc))
    assert not (gpu_check.record(results, dest_root=tmp_path / "other") / "model_vs_measured.txt").exists()


def test_a_run_where_torch_does_not_import_exits_2_not_0(tmp_path):
    # On a lent machine whose python3 lacks torch every phase after env is skipped; the run used to
    # exit 0, reading as a pass. A python without torch (the system's, where it has none) plays it.
    import shutil

    python = shutil.which("python3")
    if python is None or subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("needs a python3 without torch")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([python, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), "--budget", "60"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "torch does not import" in proc.stdout + proc.stderr


_SPLIT_FORWARD = """
import warnings
import torch, torch.nn as nn, torch.nn.functional as F
import mira_kernels as mk
from mira_kernels import reference
from benchmarks import _gpu_check_phases as ph, gpu_check
from benchmarks.eager_mira import EagerMiraLinear
warnings.simplefilter("ignore")
w = dict(gpu_check.WORKLOAD, tokens=5, d_in=16, d_out=48, slice_offsets=[0, 32], slots=3)
low = {k: v.float() for k, v in ph._op_inputs(w, 2, 0).items()}
exact = {k: v.double() for k, v in low.items()}
lin = nn.Linear(16, 48).requires_grad_(False)
lin.weight.copy_(low["weight"]); lin.bias.copy_(low["bias"])
eager = EagerMiraLinear(lin, low["keys"], low["bank_a"], low["bank_b"], w["slice_offsets"], scale=w["scale"])
opts = dict(slice_offsets=w["slice_offsets"], separation=w["separation"], scale=w["scale"])
fns, checks = ph._op_forward(low, exact, eager, ["triton"], opts, mk, reference, F, {}, {})
print(sorted(fns))
print(checks[ph.SPLIT_VARIANT]["rel_err"], checks["mira[triton]"]["rel_err"])
"""


def test_the_op_phase_times_cublas_then_the_triton_adapter():
    # vLLM's layout (cuBLAS's GEMM, then shrink and expand) models at half the fused forward's overhead
    # at B >= 64: make gpu-check times it as a variant of its own. Checked here under the interpreter.
    from tests.triton._subprocess import run

    proc = run(["-c", _SPLIT_FORWARD], interpret=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, errs = proc.stdout.strip().splitlines()[-2:]
    assert phases.SPLIT_VARIANT in names
    split_err, fused_err = map(float, errs.split())
    assert split_err < 1e-6 and fused_err < 1e-6
