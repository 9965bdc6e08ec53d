"""``make gpu-check``: one prepared command that turns a few lent GPU minutes into measurements.

Runs with the machine's own ``python3`` (``python3 -m benchmarks.gpu_check``; the Makefile's
``gpu-check`` target, arguments through ``GPU_CHECK_ARGS``): nothing is installed, nothing is
fetched, and the checkout is never written to. Five phases run in order, each in its own
process with its own time budget, so that a phase that hangs or crashes costs only itself and a
phase that runs out of time still leaves what it measured:

``env``    the machine: GPU, capability, SMs, memory, L2, driver; python, torch, triton, timm,
           pytest and nvcc versions; whether the modules the phases need import; the commit.
``build``  copies the sources into ``<work>/tree`` and builds the extension there, in place, with
           this python3: ``MAX_JOBS`` = the CPU count, ``TORCH_CUDA_ARCH_LIST`` = the running
           GPU's capability only, the CUDA C++ part required. If that fails it builds again
           without the CUDA part, so that the Triton backend can still be tested and timed.
``tests``  the ``gpu``-marked tests of that tree (pytest; in parallel with pytest-xdist and a
           per-test limit with pytest-timeout where the image has them).
``op``     the ViT-B/16 qkv projection (T=197, 768 -> 2304; published MIRA configuration r=4,
           N=30 slots, adapters on Q and V, affine separation) at B in {1, 8, 64, 256}, bf16 and
           fp32: plain ``F.linear``, ``mira_linear`` on every backend that
           ``mira_kernels.available_backends("cuda")`` lists (so a new or redesigned backend is
           timed without edits here), and the unfused eager baseline
           (``benchmarks/eager_mira.py``). Then the training step (forward + backward into x and
           the keys) at B=64. Each variant is first checked against the float64 reference, then
           timed with CUDA events (L2 flushed before every call, variants interleaved, medians
           with 95% intervals, ratios over ``F.linear`` per round) and as CUDA-graph
           replays, and its kernels are timed one by one with ``torch.profiler`` (by name).
``model``  the ViT-B/16 forward (random weights: no hub access): stock timm, MIRA attached on
           every backend, and the eager baseline attached, at the same batches and dtypes,
           eager and CUDA-graph replay, ratios over the stock model.

A phase is skipped, with its reason, when what it needs is missing (no CUDA device, no pytest,
no timm, no built extension); a failed build skips the phases after it, a failed test does not.
The whole run is held to ``--budget`` seconds (default 290, under 5 minutes): every phase gets
its own share, and time a phase leaves unused passes to the later ones.

Outputs, at most five files, in ``$OUT`` when set (a lent machine's result folder), else in
``--out`` (default ``build/gpu-check/out``, ignored by git): ``gpu_check.json`` (rewritten after
every phase; schema ``benchmarks/gpu_check.schema.json``, id :data:`SCHEMA`), ``summary.txt``
(the same as text tables, also printed at the end), ``build.log``, ``tests.log`` and
``phases.log``. Build trees and partial results live in ``--work`` (default ``build/gpu-check``).

``--dry-run`` runs the env phase, plans every other phase (what would run, or why it would be
skipped) and writes the same JSON with phases ``planned`` or ``skipped``; it exits 0 when the
run could start (torch imports), also on a machine without a GPU. ``--record`` copies a run's
files into ``benchmarks/results/gpu/<date>_<gpu>_<commit>/`` with a ``record.txt`` naming the
machine, driver, torch, triton and commit; ``--record-from DIR`` does that for a finished run's
folder fetched from another machine (its commit is matched by the source digest when the
machine had no git).

Exit status: 0 when no phase failed or timed out (skipped phases do not count), 1 otherwise,
2 for bad arguments or a run (dry or not) that found no usable torch: nothing could run.

On a lent machine: commit first (the machine gets the working tree without git; the record
finds the commit by the source digest), run ``make gpu-check`` there with a limit of about
7 minutes (the run holds itself to 290 s; the rest is start-up), then here
``python -m benchmarks.gpu_check --record-from <the returned folder>`` and commit
``benchmarks/results/gpu/``. ``GPU_CHECK_ARGS="--phases op,model"`` runs only the timings (with
env and build, which every phase needs; on a warm machine the build is then incremental).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks import _cli

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "mira-gpu-check/1"
SCHEMA_FILE = Path(__file__).with_name("gpu_check.schema.json")
PHASES = ("env", "build", "tests", "op", "model")
# Each phase's guaranteed share of the total budget (seconds); unused time flows to later phases.
# The build gets the most: without it nothing else runs.
# A share is what the later phases keep back while a phase runs, not a target. Seen on an H200
# (16 CPUs, 2026-12-04, budget 330): env 11 s, a cold build 58 s, the gpu tests 59 s; the op phase
# takes all it is given, and the model phase (the figure users pay) ran out of time at 34 s.
BUDGET_SHARES = {"env": 20.0, "build": 100.0, "tests": 65.0, "op": 50.0, "model": 55.0}
TOTAL_BUDGET_S = 290.0
OUTPUT_FILES = ("gpu_check.json", "summary.txt", "build.log", "tests.log", "phases.log")
RECORD_DIR = ROOT / "benchmarks" / "results" / "gpu"

# What the build copies into its own tree (and what the source digest covers).
SOURCE_ENTRIES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "csrc", "mira_kernels", "mira", "benchmarks",
                  "tests")
_SKIP_NAMES = {"__pycache__", ".pytest_cache", "results", "build"}
_SKIP_SUFFIXES = (".pyc", ".so", ".o", ".pyd")

# The measured problem: ViT-B/16's packed qkv projection with MIRA's published configuration.
WORKLOAD = {
    "model": "vit_base_patch16_224",
    "tokens": 197,
    "d_in": 768,
    "d_out": 2304,
    "rank": 4,
    "slots": 30,
    "slices": ["q", "v"],
    "slice_offsets": [0, 1536],
    "separation": "affine",
    "scale": 1.0,
    "batches": [1, 8, 64, 256],
    "dtypes": ["bfloat16", "float32"],
    "train_batch": 64,
    "seed": 0,
    "max_rounds": 400,  # per cell and mode; the cell's time share usually stops it first
}

# Modules the op and model phases import (the env phase imports them, so a dry run catches a rename).
_PHASE_IMPORTS = ("mira_kernels", "mira", "benchmarks._pairs", "benchmarks.eager_mira", "benchmarks.latency")
# Settings that would change what the tests and timings exercise; the phases run without them.
_CLEARED_ENV = ("MIRA_BACKEND", "MIRA_CHECK_FINITE", "TRITON_INTERPRET", "CUDA_LAUNCH_BLOCKING")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Source identity: commit when git is there, and a digest of the sources either way.
# ----------------------------------------------------------------------------------------------


def _skipped(path: Path) -> bool:
    return path.name in _SKIP_NAMES or path.name.endswith(_SKIP_SUFFIXES) or path.name.startswith(".")


def _source_files(root: Path) -> Iterator[Path]:
    for entry in SOURCE_ENTRIES:
        top = root / entry
        if top.is_file():
            yield top
        elif top.is_dir():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if not _skipped(Path(d)))
                for name in sorted(filenames):
                    if not _skipped(Path(name)):
                        yield Path(dirpath) / name


def source_digest(root: Path = ROOT) -> tuple[str, int]:
    """SHA-256 over the relative paths and contents of the sources the build copies, and their count.

    The lent machine receives a copy of the working tree without git; the digest ties its
    results to a commit afterwards (``--record-from``).
    """
    h = hashlib.sha256()
    count = 0
    for path in _source_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
        count += 1
    return h.hexdigest(), count


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_identity(root: Path = ROOT) -> dict:
    digest, files = source_digest(root)
    commit = _git("rev-parse", "HEAD", root=root)
    status = _git("status", "--porcelain", "--untracked-files=no", root=root) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status), "digest": digest, "files": files}


# ----------------------------------------------------------------------------------------------
# Running a phase's process: its own process group, a hard time limit, output to a log.
# ----------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    # The group holds what the phase started (ninja and nvcc, pytest-xdist workers); only it is ended.
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: Sequence[str], *, cwd: Path, env: dict, timeout: float, log: Path,
               title: str) -> tuple[int | None, bool]:
    """Runs ``cmd`` with stdout and stderr appended to ``log``; returns (exit code, timed out)."""
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(f"\n===== {title} ({_now_iso()}, limit {timeout:.0f} s)\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:
            _kill_group(proc)
            raise
        fh.write(f"===== {title}: {'killed at its time limit' if timed_out else f'exit {rc}'}\n")
    return rc, timed_out


def _log_tail(log: Path, lines: int = 25, since: str | None = None) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    if since is not None and since in text:
        text = text[text.rindex(since):]
    return "\n".join(text.splitlines()[-lines:])


def _error_lines(text: str, limit: int = 12) -> list[str]:
    hits = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b|Error:|FAILED", ln)]
    return hits[:limit]


# ----------------------------------------------------------------------------------------------
# The run: document, budget, phases.
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    out: Path
    work: Path
    doc: dict
    started: float = field(default_factory=time.monotonic)

    @property
    def tree(self) -> Path:
        return self.work / "tree"

    @property
    def env_info(self) -> dict:
        return self.doc["environment"]

    def phase(self, name: str) -> dict:
        return self.doc["phases"][name]

    def budget_for(self, name: str) -> float:
        """This phase's time limit: what is left of the total minus the shares of the phases after it."""
        later = self.doc["plan"]["phases"]
        later = later[later.index(name) + 1:] if name in later and not self.args.dry_run else []
        left = self.args.budget - (time.monotonic() - self.started)
        return max(5.0, left - sum(self.share(p) for p in later))

    def share(self, name: str) -> float:
        return BUDGET_SHARES[name] * self.args.budget / sum(BUDGET_SHARES.values())  # --budget scales them alike

    def child_env(self, pythonpath: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
        env["PYTHONPATH"] = str(pythonpath)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the checkout when a phase imports from it
        return env

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.doc, indent=1, sort_keys=False) + "\n")
        _atomic_write(self.out / "summary.txt", render_summary(self.doc))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def new_document(args: argparse.Namespace, phases: Sequence[str], workload: dict) -> dict:
    return {
        "schema": SCHEMA,
        "mode": "dry-run" if args.dry_run else "run",
        "started": _now_iso(),
        "finished": None,
        "exit_status": None,
        "argv": list(args.argv),
        "source": source_identity(),
        "plan": {
            "phases": list(phases),
            "total_budget_s": args.budget,
            "budget_shares_s": {p: BUDGET_SHARES[p] for p in PHASES},
            "workload": workload,
            "arch_override": args.arch,
        },
        "environment": {},
        "phases": {p: {"status": "planned" if p in phases else "skipped",
                       "reason": None if p in phases else "not selected (--phases)",
                       "seconds": None, "budget_s": None} for p in PHASES},
    }


def _child_phase(run: Run, name: str, budget: float, pythonpath: Path, cwd: Path) -> dict:
    """Runs ``benchmarks._gpu_check_phases <name>`` and returns what it recorded, status included."""
    partial = run.work / f"{name}.partial.json"
    partial.unlink(missing_ok=True)
    # The child plans its work to end a few seconds before the hard limit, so the limit is for hangs.
    cmd = [sys.executable, "-m", "benchmarks._gpu_check_phases", name, "--partial", str(partial),
           "--budget", f"{max(budget - 4.0, 2.0):.1f}", "--workload", json.dumps(run.doc["plan"]["workload"])]
    log = run.out / "phases.log"
    rc, timed_out = run_logged(cmd, cwd=cwd, env=run.child_env(pythonpath), timeout=budget, log=log,
                               title=f"phase {name}")
    try:
        data = json.loads(partial.read_text())
    except (OSError, ValueError):
        data = {}
    if timed_out:
        data["status"] = "timeout"
        data["reason"] = f"killed at its limit of {budget:.0f} s; what it measured before is kept"
    elif rc != 0 or data.get("status") in (None, "running"):
        data["status"] = "failed"
        tail = _log_tail(log, 15, since=f"===== phase {name}")
        data["reason"] = data.get("reason") or f"exit {rc}: " + " | ".join(tail.splitlines()[-6:])
    return data


# --- env ----------------------------------------------------------------------------------------


def phase_env(run: Run, budget: float) -> dict:
    data = _child_phase(run, "env", budget, pythonpath=ROOT, cwd=ROOT)
    run.doc["environment"] = data.pop("environment", {}) or {}
    return data


def _torch_ok(run: Run) -> str | None:
    env, probe = run.env_info, run.phase("env")
    if probe["status"] != "ok":
        return f"the env phase is {probe['status']} ({probe.get('reason')}), so the environment is unknown"
    if not env.get("torch"):
        return "torch does not import with this python: " + (env.get("torch_error") or "unknown error")
    return None


def _gpu_reason(run: Run) -> str | None:
    return _torch_ok(run) or (None if run.env_info.get("gpu") else
                              f"no CUDA device ({run.env_info.get('cuda_reason') or 'unknown'})")


# --- build --------------------------------------------------------------------------------------


def _arch(run: Run) -> str | None:
    if run.args.arch:
        return run.args.arch
    gpu = run.env_info.get("gpu")
    return gpu["capability"] if gpu else None


def plan_build(run: Run) -> str | None:
    reason = _torch_ok(run)
    if reason:
        return reason
    if _arch(run) is None:
        return _gpu_reason(run) + "; the check builds for the running GPU only (--arch names a target)"
    return None


def sync_tree(src: Path, dest: Path) -> int:
    """Copies the sources into ``dest`` (its ``build/`` and built extension stay for ninja).

    Each source folder is replaced whole, so a file deleted in the checkout is gone from the tree
    too; timestamps are kept, so ninja recompiles only what changed since the last run.
    """
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for entry in SOURCE_ENTRIES:
        target = dest / entry
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for path in _source_files(src):
        rel = path.relative_to(src)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        count += 1
    return count


def phase_build(run: Run, budget: float) -> dict:
    start = time.monotonic()
    tree = run.tree
    files = sync_tree(ROOT, tree)
    arch = _arch(run)
    jobs = os.cpu_count() or 2
    log = run.out / "build.log"
    attempts = []
    for with_cuda in (True, False):
        left = budget - (time.monotonic() - start) - 15.0  # keep time for the import check
        if left < 10:
            break
        env = run.child_env(tree)
        env.update(MAX_JOBS=str(jobs), TORCH_CUDA_ARCH_LIST=arch, MIRA_BUILD_CUDA="1" if with_cuda else "0")
        t0 = time.monotonic()
        rc, timed_out = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                                   timeout=left, log=log,
                                   title=f"build {'with' if with_cuda else 'without'} the CUDA part, arch {arch}")
        attempts.append({"cuda": with_cuda, "exit_code": rc, "timed_out": timed_out,
                         "seconds": round(time.monotonic() - t0, 1)})
        if rc == 0 or timed_out:
            break
    result = {"arch": arch, "jobs": jobs, "tree": str(tree), "files_copied": files, "attempts": attempts,
              "log": "build.log", "errors": _error_lines(_log_tail(log, 400, since="===== build"))}
    last = attempts[-1] if attempts else None
    if last is None or last["exit_code"] != 0:
        result["status"] = "timeout" if last and last["timed_out"] else "failed"
        result["reason"] = ("the build was killed at its time limit" if last and last["timed_out"]
                            else "the extension did not build; see errors and build.log")
        return result
    verify = _verify_extension(run, max(budget - (time.monotonic() - start), 5.0))
    result["extension"] = verify
    if not verify.get("extension_loaded"):
        result["status"] = "failed"
        result["reason"] = "built, but mira_kernels._C does not load: " + str(verify.get("load_error"))
    elif not last["cuda"]:
        result["status"] = "ok"
        result["reason"] = "the CUDA C++ part failed to build (see errors); built without it, so Triton runs"
    else:
        result["status"] = "ok"
        result["reason"] = None
    return result


_VERIFY = """
import json, torch, mira_kernels as mk
info = mk.build_info()
info["available_backends"] = mk.available_backends("cuda") if torch.cuda.is_available() else []
print("GPU_CHECK_EXTENSION " + json.dumps(info))
"""


def _verify_extension(run: Run, budget: float) -> dict:
    env = run.child_env(run.tree)
    try:
        proc = subprocess.run([sys.executable, "-c", _VERIFY], cwd=run.tree, env=env, capture_output=True, text=True,
                              timeout=budget)
    except subprocess.TimeoutExpired:
        return {"extension_loaded": False, "load_error": f"the import check took over {budget:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("GPU_CHECK_EXTENSION "):
            return json.loads(line.split(" ", 1)[1])
    return {"extension_loaded": False, "load_error": (proc.stderr or proc.stdout).strip()[-800:]}


def _built(run: Run) -> str | None:
    build = run.phase("build")
    if build["status"] != "ok":
        return f"the build phase is {build['status']}" + (f" ({build['reason']})" if build.get("reason") else "")
    return None


# --- tests --------------------------------------------------------------------------------------


def plan_tests(run: Run) -> str | None:
    if _torch_ok(run):
        return _torch_ok(run)
    if not run.env_info.get("versions", {}).get("pytest"):
        return "pytest is not installed for this python"
    return _gpu_reason(run) or _built(run)


def _pytest_command(run: Run, budget: float, junit: Path) -> list[str]:
    # A module that fails to import (a package the image lacks) must not stop the gpu tests of the others.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rfE",
           "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
    versions = run.env_info.get("versions", {})
    if versions.get("pytest-xdist"):
        # Triton and torch.compile compile on the CPU: workers overlap that; the GPU has room for all.
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 2) // 2)))]
    if versions.get("pytest-timeout"):
        # Only for a hang (xdist carries on with the other workers): a cold torch.compile test takes tens of seconds.
        cmd += [f"--timeout={max(60, int(budget / 2))}"]
    return cmd


_OUTCOME = re.compile(r"(?:(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))"
                      r"|(?:(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+::\S+))")


def parse_pytest_log(text: str) -> dict:
    """Outcomes from pytest's verbose lines (used when it was killed before writing its XML)."""
    outcomes: dict[str, str] = {}
    for m in _OUTCOME.finditer(text):
        test = m.group(1) or m.group(4)
        outcome = m.group(2) or m.group(3)
        outcomes[test] = outcome
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
             "XPASS": "xpassed"}
    for outcome in outcomes.values():
        counts[names[outcome]] += 1
    failures = [{"test": t, "message": ""} for t, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return {"counts": counts, "failures": failures, "skip_reasons": {}}


def parse_junit(path: Path) -> dict:
    """Counts, failures (test id and first lines of the message) and skip reasons from a JUnit XML."""
    import xml.etree.ElementTree as ET

    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    failures, skip_reasons = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            counts["failed" if failure is not None else "error"] += 1
            # The attribute is pytest's one-line summary ("collection failure" for an import error);
            # the "E " lines of the traceback say what went wrong.
            summary = (node.get("message") or "").strip()
            detail = [ln[1:].strip() for ln in (node.text or "").splitlines() if ln.startswith("E ")]
            message = " | ".join(filter(None, [summary, *[d for d in detail if d not in summary][:4]]))
            failures.append({"test": test, "message": message[:600]})
        elif skipped is not None:
            reason = (skipped.get("message") or "").strip()
            if skipped.get("type") == "pytest.xfail":
                counts["xfailed"] += 1
            else:
                counts["skipped"] += 1
                skip_reasons[reason[:200]] = skip_reasons.get(reason[:200], 0) + 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures, "skip_reasons": skip_reasons}


def phase_tests(run: Run, budget: float) -> dict:
    junit = run.work / "tests.xml"
    junit.unlink(missing_ok=True)
    cmd = _pytest_command(run, budget, junit)
    log = run.out / "tests.log"
    rc, timed_out = run_logged(cmd, cwd=run.tree, env=run.child_env(run.tree), timeout=budget, log=log,
                               title="gpu tests")
    if junit.exists() and not timed_out:
        result = parse_junit(junit)
    else:
        result = parse_pytest_log(_log_tail(log, 100000, since="===== gpu tests"))
    result.update(command=shlex.join(cmd[1:]), exit_code=rc, log="tests.log")
    c = result["counts"]
    ran = sum(c.values())
    if timed_out:
        result["status"], result["reason"] = "timeout", f"killed at {budget:.0f} s after {ran} tests had finished"
    elif rc == 0:
        result["status"], result["reason"] = "ok", None
    elif rc == 5 or ran == 0:
        result["status"], result["reason"] = "failed", f"pytest ran no test (exit {rc}); see tests.log"
    else:
        result["status"] = "failed"
        result["reason"] = f"{c['failed']} failed and {c['error']} errors of {ran} tests (exit {rc})"
    return result


# --- op and model -------------------------------------------------------------------------------


def plan_op(run: Run) -> str | None:
    return _gpu_reason(run) or _built(run)


def plan_model(run: Run) -> str | None:
    if _torch_ok(run):
        return _torch_ok(run)
    if not run.env_info.get("versions", {}).get("timm"):
        return "timm is not installed for this python"
    return _gpu_reason(run) or _built(run)


def phase_op(run: Run, budget: float) -> dict:
    return _child_phase(run, "op", budget, pythonpath=run.tree, cwd=run.tree)


def phase_model(run: Run, budget: float) -> dict:
    return _child_phase(run, "model", budget, pythonpath=run.tree, cwd=run.tree)


@dataclass(frozen=True)
class Phase:
    plan: Callable[[Run], str | None]  # None when the phase can run, else why it is skipped
    run: Callable[[Run, float], dict]
    describe: Callable[[Run], dict]  # what it would do: recorded in both modes


def _cells_plan(run: Run, modes: Sequence[str]) -> list[str]:
    w = run.doc["plan"]["workload"]
    cells = [f"forward {d} B={b}" for d in w["dtypes"] for b in w["batches"]] if "forward" in modes else []
    return cells + ([f"training {d} B={w['train_batch']}" for d in w["dtypes"]] if "training" in modes else [])


def describe_build(run: Run) -> dict:
    return {"does": "copy the sources to <work>/tree and build the extension there in place",
            "command": f"{sys.executable} setup.py build_ext --inplace", "cwd": str(run.tree),
            "env": {"MAX_JOBS": str(os.cpu_count() or 2),
                    "TORCH_CUDA_ARCH_LIST": _arch(run) or "<the running GPU's compute capability>",
                    "MIRA_BUILD_CUDA": "1, then 0 if the CUDA part fails"}}


def describe_tests(run: Run) -> dict:
    return {"does": "the gpu-marked tests of the built tree",
            "command": shlex.join(_pytest_command(run, BUDGET_SHARES["tests"], run.work / "tests.xml"))}


PHASE_TABLE = {
    "env": Phase(lambda run: None, phase_env, lambda run: {
        "does": "GPU, driver, versions, nvcc, and imports of " + ", ".join(_PHASE_IMPORTS)}),
    "build": Phase(plan_build, phase_build, describe_build),
    "tests": Phase(plan_tests, phase_tests, describe_tests),
    "op": Phase(plan_op, phase_op, lambda run: {
        "does": "qkv projection: F.linear, mira_linear on each of available_backends('cuda'), eager baseline; "
                "checked against float64, then eager and CUDA-graph timings and per-kernel profiles",
        "cells": _cells_plan(run, ("forward", "training"))}),
    "model": Phase(plan_model, phase_model, lambda run: {
        "does": f"{WORKLOAD['model']} forward: stock, MIRA attached on each backend, eager baseline attached; "
                "eager and CUDA-graph timings",
        "cells": _cells_plan(run, ("forward",))}),
}


# ----------------------------------------------------------------------------------------------
# Summary tables.
# ----------------------------------------------------------------------------------------------


def _cell_text(r: dict) -> str:
    """One variant in one cell: eager|graph microseconds, then eager|graph ratios over the baseline."""
    if r.get("error"):
        return "ERROR"
    if not r.get("ok"):
        check = r.get("check") or {}
        if check.get("finite") is False:
            return "WRONG (inf/NaN)"
        return f"WRONG (rel err {check['rel_err']:.1e})" if check.get("rel_err") is not None else "WRONG"

    def us(stat: dict | None) -> str:
        return "-" if not stat else f"{stat['median']:.{1 if stat['median'] < 1000 else 0}f}"

    def ratio(x: dict | None) -> str:
        return "-" if not x else f"{x['ratio']:.2f}"

    ratios = r.get("vs_baseline") or {}
    text = f"{us(r.get('eager_us'))}|{us(r.get('graph_us'))}"
    if r["variant"] != r.get("baseline"):
        text += f" {ratio(ratios.get('eager'))}|{ratio(ratios.get('graph'))}x"
    return text


def _measurement_table(rows: list[dict]) -> list[str]:
    """Rows: (mode, dtype, batch); columns: variants; then each distinct error once."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["mode"], r["dtype"], r["batch"]), {})[r["variant"]] = r
    width = max(16, *(len(_cell_text(r)) + 2 for r in rows))
    lines = ["  " + f"{'':<24}" + "".join(f"{v:>{width}}" for v in variants)]
    for (mode, dtype, batch), by_variant in cells.items():
        label = f"{mode} {dtype} B={batch}"
        lines.append("  " + f"{label:<24}" + "".join(
            f"{_cell_text(by_variant[v]) if v in by_variant else '':>{width}}" for v in variants))
    notes = {}
    for r in rows:
        for what in ("error", "graph_error", "kernels_error"):
            if r.get(what):
                notes.setdefault((r["variant"], what, r[what][:160]), []).append(f"{r['dtype']} B={r['batch']}")
    lines += [f"  {variant} {what.replace('_', ' ')} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''}):"
              f" {text}" for (variant, what, text), where in notes.items()]
    return lines


def _kernel_lines(rows: list[dict], per_variant: int = 6) -> list[str]:
    """The profiled kernels of one forward and one training cell (bf16 at B=64 when measured)."""
    lines = []
    for mode in ("forward", "training"):
        with_kernels = [r for r in rows if r["mode"] == mode and r.get("kernels")]
        if not with_kernels:
            continue
        key = min({(r["dtype"], r["batch"]) for r in with_kernels},
                  key=lambda k: (k[0] != "bfloat16", abs(k[1] - 64)))
        lines.append(f"  {mode} {key[0]} B={key[1]}: device time per call (us), launches, kernel")
        for r in with_kernels:
            if (r["dtype"], r["batch"]) != key:
                continue
            lines.append(f"    {r['variant']}: {r['kernel_us_total']:.1f} us in "
                         f"{sum(k['calls'] for k in r['kernels']):g} launches")
            lines += [f"      {k['us']:>9.1f} {k['calls']:>4g}  {k['name'][:90]}" for k in r["kernels"][:per_variant]]
    return lines


def render_summary(doc: dict) -> str:
    env = doc.get("environment") or {}
    gpu = env.get("gpu") or {}
    versions = env.get("versions") or {}
    src = doc.get("source") or {}
    commit = (src.get("commit") or "no git")[:12] + (" (dirty)" if src.get("dirty") else "")
    lines = [
        f"mira-kernels gpu-check ({doc.get('mode')}), started {doc.get('started')}, schema {doc.get('schema')}",
        f"  machine: {gpu.get('name', 'no CUDA device')}"
        + (f", sm {gpu['capability']}, {gpu.get('sms')} SMs, {gpu.get('memory_gib')} GiB, driver {gpu.get('driver')}"
           if gpu else ""),
        f"  python {env.get('python', '?')}, torch {versions.get('torch') or '-'}"
        f" (CUDA {env.get('torch_cuda') or '-'}), triton {versions.get('triton') or '-'},"
        f" timm {versions.get('timm') or '-'}, nvcc {env.get('nvcc') or '-'}",
        f"  source: commit {commit}, digest {src.get('digest', '?')[:12]}",
        "",
        f"  {'phase':<7}{'status':<9}{'seconds':>9}{'limit':>8}  note",
    ]
    for name, ph in doc.get("phases", {}).items():
        secs = "-" if ph.get("seconds") is None else f"{ph['seconds']:.1f}"
        limit = "-" if ph.get("budget_s") is None else f"{ph['budget_s']:.0f}"
        note = ph.get("reason") or (ph.get("plan") or {}).get("does", "")
        lines.append(f"  {name:<7}{ph.get('status', '?'):<9}{secs:>9}{limit:>8}  {note[:160]}")
    for problem in env.get("problems", []):
        lines.append(f"  ! {problem}")
    tests = doc.get("phases", {}).get("tests", {})
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", "gpu tests: " + ", ".join(f"{v} {k}" for k, v in c.items() if v)]
        failures = tests.get("failures", [])
        lines += [f"  FAILED {f['test']}: {' '.join(f['message'].split())[:130]}" for f in failures[:15]]
        lines += [f"  ... and {len(failures) - 15} more in gpu_check.json"] if len(failures) > 15 else []
    for name, baseline in (("op", "linear"), ("model", "stock")):
        rows = doc.get("phases", {}).get(name, {}).get("measurements") or []
        if rows:
            lines += ["", f"{name}: microseconds, eager|graph (medians; CUDA events, L2 flushed before each call),"
                          f" then eager|graph ratio over {baseline} (median per-round ratio)"]
            lines += _measurement_table(rows)
            kernels = _kernel_lines(rows)
            if kernels:
                lines += ["", f"{name}: kernels (torch.profiler)", *kernels]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Recording.
# ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def record(results: Path, dest_root: Path = RECORD_DIR, repo: Path = ROOT) -> Path:
    """Copies a finished run's files into ``dest_root/<date>_<gpu>_<commit>/`` with a record.txt.

    The commit is the run's own when it had a clean git checkout; otherwise this checkout's HEAD,
    provided the run's source digest equals HEAD's (else the run's dirty commit, or unknown).
    """
    doc = json.loads((results / "gpu_check.json").read_text())
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{results}/gpu_check.json has schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc.get("mode") != "run":
        raise SystemExit("refusing to record a dry run: it measured nothing")
    env = doc.get("environment") or {}
    gpu = env.get("gpu") or {}
    src = doc.get("source") or {}
    commit, how = src.get("commit"), "the run's own git checkout"
    if commit and src.get("dirty"):
        how += " (with uncommitted changes)"
    if not commit or src.get("dirty"):
        # The lent machine's git copy can be older than the tree it received (it was seen naming an
        # earlier commit "with uncommitted changes"): the digest of the sources decides.
        here = source_identity(repo)
        if here["digest"] == src.get("digest") and here["commit"] and not here["dirty"]:
            commit, how = here["commit"], "matched: the run's source digest equals this checkout's HEAD"
            if src.get("commit") and src["commit"] != here["commit"]:
                how += f" (the run's git named {src['commit'][:12]} with uncommitted changes)"
        elif not commit:
            how = "unknown: the run had no git and its source digest matches no clean checkout here"
    versions = env.get("versions") or {}
    day = (doc.get("started") or _now_iso())[:10]
    name = f"{day}_{_slug(gpu.get('name', 'no-gpu'))}_{(commit or 'src-' + src.get('digest', 'unknown'))[:11]}"
    dest = dest_root / name
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for fname in OUTPUT_FILES:
        if (results / fname).exists():
            shutil.copy2(results / fname, dest / fname)
            copied.append(fname)
    phases = doc.get("phases", {})
    lines = [
        f"machine: {gpu.get('name', 'no CUDA device')}, compute capability {gpu.get('capability', '-')}, "
        f"{gpu.get('sms', '-')} SMs, {gpu.get('memory_gib', '-')} GiB; {env.get('cpu_count', '?')} CPUs "
        f"({env.get('cpu', '?')})",
        f"driver: {gpu.get('driver', '-')}",
        f"torch: {versions.get('torch', '-')} (CUDA {env.get('torch_cuda', '-')});"
        f" triton: {versions.get('triton', '-')}; python {env.get('python', '-')}; nvcc {env.get('nvcc', '-')}",
        f"commit: {commit or 'unknown'} ({how}); source digest {src.get('digest')}",
        f"run: started {doc.get('started')}, finished {doc.get('finished')}, exit status {doc.get('exit_status')}",
        "phases: " + ", ".join(f"{p} {ph.get('status')}" for p, ph in phases.items()),
        f"files: {', '.join(copied)}",
    ]
    model = model_vs_measured(doc, dest.name)
    if model is not None:
        (dest / "model_vs_measured.txt").write_text(model + "\n", encoding="utf-8")
        lines.append("model_vs_measured.txt: benchmarks.gpu_model calibrated to this run, every other cell held out")
    (dest / "record.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def model_vs_measured(doc: dict, name: str) -> str | None:
    """The performance model calibrated to a run with a model phase, beside its measurements (so each
    recorded run says how far the model is from it); None without one, or a line saying why not."""
    if not ((doc.get("phases") or {}).get("model") or {}).get("measurements"):
        return None
    try:
        from benchmarks import gpu_model
    except ImportError as exc:  # the model needs the Triton planner (triton installed)
        return f"no model: {exc}"
    mach = replace(gpu_model.Machine(), host_planning=gpu_model.measure_host_planning())
    cal, notes = gpu_model.calibrate(mach, doc)
    return gpu_model.report(cal, measured=doc, calibration=(f"this run ({name})", notes, doc))


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


class _HelpFormatter(_cli.HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default, and the description as written."""


#: TORCH_CUDA_ARCH_LIST's entries (torch.utils.cpp_extension._get_cuda_arch_flags): a compute capability
#: with an optional arch-specific suffix and +PTX, or an architecture's name (which torch expands).
_ARCH_ENTRY = re.compile(r"\d+\.\d+[a-z]?(\+PTX)?"
                         r"|(Kepler|Maxwell|Pascal|Volta|Turing|Ampere|Ada|Hopper|Blackwell|Rubin)(\+Tegra)?")


def arch_list_problem(text: str) -> str | None:
    """Why ``text`` is not a TORCH_CUDA_ARCH_LIST (None when it is): entries separated by ';' or spaces.
    The syntax only: which capabilities the GPU machine's torch and nvcc support is known there."""
    entries = text.replace(" ", ";").split(";")
    bad = [e for e in entries if not _ARCH_ENTRY.fullmatch(e)]
    if not bad:
        return None
    return (f"not a compute capability: {', '.join(repr(e) for e in bad)}; expected a TORCH_CUDA_ARCH_LIST "
            "such as 9.0, 9.0a, '8.0;9.0+PTX' or Hopper")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="probe the environment and plan every phase; run nothing")
    p.add_argument("--out", type=Path, help="result folder (default: $OUT when set, else build/gpu-check/out)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check",
                   help="scratch folder for the build tree and partial results (default: build/gpu-check)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (env, and build for the others, always run)")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8,64,256)")
    p.add_argument("--dtypes", help="comma-separated dtypes (default bfloat16,float32)")
    # Finite: NaN passed a `< 30` test and cut every phase to its 5 s minimum; inf left NaN shares.
    p.add_argument("--budget", type=_cli.finite_float_at_least(30), default=TOTAL_BUDGET_S,
                   help="seconds for the whole run, at least 30 (default 290)")
    p.add_argument("--arch", help="build for this compute capability instead of the running GPU's: a "
                   "TORCH_CUDA_ARCH_LIST, e.g. 9.0, 9.0a, '8.0;9.0+PTX' or Hopper")
    p.add_argument("--record", action="store_true", help="after the run, copy its files to benchmarks/results/gpu/")
    p.add_argument("--record-from", type=Path, metavar="DIR",
                   help="record a finished run's folder (e.g. fetched from a lent machine) and run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.record and args.dry_run:  # was silently ignored: a dry run measures nothing to record
        p.error("--record: a --dry-run has nothing to record; drop one of them")
    if args.arch is not None and (problem := arch_list_problem(args.arch)):  # not a failed build minutes later
        p.error(f"--arch {args.arch!r}: {problem}")
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}; expected some of {list(PHASES)}")
    phases.append("env")  # every other phase decides from what env found
    if {"tests", "op", "model"} & set(phases):
        phases.append("build")  # they run the built tree (an unchanged tree rebuilds in seconds)
    args.phase_list = [ph for ph in PHASES if ph in phases]
    workload = dict(WORKLOAD)
    try:
        if args.batches:
            workload["batches"] = sorted({int(b) for b in args.batches.split(",")})
            if min(workload["batches"]) < 1:
                raise ValueError("batch sizes must be >= 1")
    except ValueError as exc:
        p.error(f"--batches: {exc}")
    if args.dtypes:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = sorted(set(dtypes) - {"bfloat16", "float16", "float32"})
        if bad or not dtypes:
            p.error(f"--dtypes: {bad or 'none given'}; expected bfloat16, float16 and/or float32")
        workload["dtypes"] = dtypes
    args.workload = workload
    if args.record_from is not None:  # read (and refused) now: record() raised a traceback at it
        _cli.read_json(p, "--record-from", args.record_from / "gpu_check.json")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else args.work / "out"
    for flag, folder in (("--out", args.out), ("--work", args.work)):
        if problem := _cli.output_problem(folder, folder=True):
            p.error(f"{flag}: {problem}")
    return args


def _say(text: str) -> None:
    print(f"[gpu-check] {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record_from is not None:
        dest = record(args.record_from)
        _say(f"recorded {args.record_from} as {dest.relative_to(ROOT)}")
        return 0
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for fname in OUTPUT_FILES:  # a result folder holds one run
        (out / fname).unlink(missing_ok=True)
    run = Run(args, out, work, new_document(args, args.phase_list, args.workload))
    run.write()
    _say(f"{'dry run' if args.dry_run else 'run'}: phases {','.join(args.phase_list)}; results in {out}")
    try:
        for name in args.phase_list:
            ph = run.phase(name)
            spec = PHASE_TABLE[name]
            reason = spec.plan(run)
            ph["plan"] = spec.describe(run)
            if reason is not None:
                ph.update(status="skipped", reason=reason)
            elif args.dry_run and name != "env":
                ph.update(status="planned", reason=None, budget_s=round(run.share(name), 1))
            else:
                budget = run.budget_for(name)
                ph.update(status="running", budget_s=round(budget, 1))
                run.write()
                t0 = time.monotonic()
                try:
                    result = spec.run(run, budget)
                except Exception as exc:  # noqa: BLE001 - a broken phase is reported, the rest still runs
                    result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                result.setdefault("reason", None)
                ph.update(result)
                ph["seconds"] = round(time.monotonic() - t0, 1)
            _say(f"{name}: {ph['status']}" + (f" in {ph['seconds']} s" if ph.get("seconds") is not None else "")
                 + (f" ({ph['reason']})" if ph.get("reason") else ""))
            run.write()
    except KeyboardInterrupt:
        for ph in run.doc["phases"].values():
            if ph["status"] == "running":
                ph.update(status="failed", reason="interrupted")
        run.doc["exit_status"] = 130
        run.doc["finished"] = _now_iso()
        run.write()
        raise
    statuses = [ph["status"] for ph in run.doc["phases"].values()]
    if _torch_ok(run):  # nothing could run: a lent machine's wrong python must not read as a pass
        status = 2
    else:
        status = 1 if not args.dry_run and any(s in ("failed", "timeout") for s in statuses) else 0
    run.doc["exit_status"] = status
    run.doc["finished"] = _now_iso()
    run.write()
    print(render_summary(run.doc), flush=True)
    if args.record and not args.dry_run:
        dest = record(out)
        _say(f"recorded as {dest.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
