"""Every MIRA Triton kernel under the Triton interpreter, in a child process (see interp_checks.py)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.triton._subprocess import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _interpreter_checks(marks: str, at_least: int) -> None:
    proc = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore:tl.make_block_ptr:UserWarning",
                "-m", marks, "tests/triton/interp_checks.py"], interpret=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= at_least, summary
    assert "skipped" not in summary and "failed" not in summary, summary
    print(summary)


def test_kernels_match_spec_under_interpreter():
    # CI: every kernel, dtype and separation once, and every defect's regression check.
    _interpreter_checks("not slow", 30)


@pytest.mark.slow
def test_more_cases_match_spec_under_interpreter():
    # make test-slow: the rest of the matrix (more separations per dtype, regimes, output masks).
    _interpreter_checks("slow", 8)


def test_import_mira_kernels_does_not_load_the_triton_backend():
    # The backend loads when it is first used; the package must import without it. Then the
    # backend's light entry (unavailable_reason) must not load the kernels. One child (each start
    # imports torch: seconds of CI).
    code = ("import sys, mira_kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('mira_kernels.triton'))); "
            "import mira_kernels.triton as t; t.unavailable_reason(); "
            "print(sorted(m for m in sys.modules if m.startswith('mira_kernels.triton.')))")
    proc = run(["-c", code], interpret=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "[]"], proc.stdout
