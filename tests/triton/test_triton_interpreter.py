"""Every MIRA Triton kernel under the Triton interpreter, in a child process (see interp_checks.py)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.triton._subprocess import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_kernels_match_spec_under_interpreter():
    proc = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore:tl.make_block_ptr:UserWarning",
                "tests/triton/interp_checks.py"], interpret=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30, summary
    assert "skipped" not in summary and "failed" not in summary, summary
    print(summary)
