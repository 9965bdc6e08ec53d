"""The C++ CPU sources build for aarch64: the x86 kernels are conditional, the portable baseline is everywhere.

Uses Debian's cross compiler (``apt-get install g++-aarch64-linux-gnu``); skipped where it is not
installed. Against the torch headers of this environment (they are the same on every architecture).

In ``make test``, cheaply: the three kernel files compiled to aarch64 objects (the avx2/avx512 ones
empty, the baseline one defining its table), and the ISA dispatch file (mira_linear_cpu.cpp)
preprocessed for aarch64 and checked free of x86-only builtins and intrinsics (its x86-64
preprocessing does have the ISA checks). ``make cross-aarch64`` compiles every C++ source for
aarch64 (minutes: each file parses the large torch headers).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("aarch64-linux-gnu-g++")
NM = shutil.which("aarch64-linux-gnu-nm")
EM_AARCH64 = 183  # ELF e_machine of AArch64

pytestmark = pytest.mark.skipif(CXX is None, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")

# What fails to compile (or would run illegal instructions) on aarch64 if it reached that build.
X86_ONLY = re.compile(r"__builtin_cpu_supports|__builtin_cpu_init|\b_mm\d*_\w+|\b__m(128|256|512)\w*")


def _torch_includes() -> list[str]:
    from torch.utils import cpp_extension

    paths = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    return [f"-I{p}" for p in paths]


def _flags(torch_headers: bool) -> list[str]:
    # As setup.py compiles them (-std=c++20, -Wall, -fopenmp), warnings as errors for our files.
    flags = ["-std=c++20", "-Wall", "-Wno-unused-function", "-Werror", "-fopenmp", f"-I{ROOT / 'csrc'}"]
    if torch_headers:
        flags += [*_torch_includes(), "-DTORCH_EXTENSION_NAME=_C", "-Wno-error=deprecated-declarations"]
    return flags


def _run_all(commands: list[list[str]]) -> None:
    """Runs the compiler commands two at a time (CI has 2 cores); fails with the compiler's output."""
    pending = list(commands)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                 for cmd in batch]
        for cmd, proc in procs:
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"


def _e_machine(obj: Path) -> int:
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def test_kernels_compile_for_aarch64_with_the_baseline_only(tmp_path):
    cpu = ROOT / "csrc" / "cpu"
    objs = {name: tmp_path / f"{name}.o" for name in ("kernels_baseline", "kernels_avx2", "kernels_avx512")}
    _run_all([[CXX, *_flags(False), "-O2", "-c", str(cpu / f"{name}.cpp"), "-o", str(obj)]
              for name, obj in objs.items()])
    for obj in objs.values():
        assert _e_machine(obj) == EM_AARCH64
    if NM is not None:
        def defined(obj):
            out = subprocess.run([NM, "-C", "--defined-only", str(obj)], capture_output=True, text=True, check=True)
            return out.stdout

        assert "mira_cpu::baseline::table()" in defined(objs["kernels_baseline"])
        for name in ("kernels_avx2", "kernels_avx512"):
            assert "table()" not in defined(objs[name]), f"{name} must be empty off x86-64"


def test_isa_dispatch_has_no_x86_code_on_aarch64(tmp_path):
    src = ROOT / "csrc" / "cpu" / "mira_linear_cpu.cpp"
    pre = tmp_path / "mira_linear_cpu.ii"
    _run_all([[CXX, *_flags(True), "-E", "-P", str(src), "-o", str(pre)]])
    # Only our own code matters (the torch headers' x86 parts are conditional already): the text
    # after the last line of theirs, i.e. from our namespace on.
    text = pre.read_text()
    ours = text[text.index("namespace mira_cpu"):]
    found = sorted(set(m.group(0) for m in X86_ONLY.finditer(ours)))
    assert not found, f"x86-only code reaches the aarch64 build: {found}"
    host_cxx = shutil.which("g++")
    if host_cxx is not None and platform.machine() == "x86_64":
        # The check can fail: on x86-64 the same file's own code has the ISA checks (the intrinsics
        # headers it includes there would match too, so look for what only our code has).
        out = subprocess.run([host_cxx, *_flags(True), "-E", "-P", str(src)], capture_output=True, text=True,
                             check=True).stdout
        assert "__builtin_cpu_supports" in out[out.index("namespace mira_cpu"):]


@pytest.mark.skipif(os.environ.get("CROSS_COMPILE_ALL") != "1",
                    reason="every source takes minutes: run by `make cross-aarch64` (CROSS_COMPILE_ALL=1)")
def test_every_cpp_source_compiles_for_aarch64():
    sources = sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    assert len(sources) >= 6
    _run_all([[CXX, *_flags(True), "-O0", "-fsyntax-only", str(src)] for src in sources])
