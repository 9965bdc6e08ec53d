"""One parser and one rule for every MIRA_* environment variable (mira_kernels/_config.py; the C++
kernel's two variables through csrc/env.h): whitespace and case alike everywhere, on/off spellings
alike, and a bad value a ValueError naming the variable and the allowed values, on every path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mira_kernels as mk
from mira_kernels import _config, _extension
from tests.mira_inputs import make_inputs

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _extension.loaded, reason="the C++ extension did not build")

# (raw value, canonical value or None for a ValueError), per variable.
SPELLINGS = {
    "MIRA_CHECK_FINITE": [("1", "1"), (" ON ", "1"), ("True", "1"), ("yes\n", "1"), ("0", "0"), ("off", "0"),
                          ("FALSE", "0"), ("\tno", "0"), ("", "0"), ("  ", "0"), ("2", None), ("maybe", None),
                          ("enable", None), ("1 1", None)],
    "MIRA_CPU_STREAM": [("auto", "auto"), (" AUTO", "auto"), ("1", "1"), ("on", "1"), ("Yes", "1"), ("0", "0"),
                        ("off ", "0"), ("", "auto"), ("2", None), ("sometimes", None), ("-1", None)],
    "MIRA_CPU_ISA": [("auto", "auto"), ("AVX2", "avx2"), (" baseline ", "baseline"), ("", "auto"), ("sse9", None),
                     ("1", None), ("avx-2", None)],
    "MIRA_BACKEND": [("reference", "reference"), (" Reference ", "reference"), ("CPU", "cpu"), ("", ""),
                     ("1", None), ("ref", None)],
    "MIRA_BUILD_CUDA": [("auto", "auto"), ("1", "1"), ("off", "0"), ("", "auto"), ("maybe", None)],
}
CASES = [(name, raw, want) for name, rows in SPELLINGS.items() for raw, want in rows]


@pytest.mark.parametrize("name, raw, want", CASES)
def test_one_rule_for_every_variable(monkeypatch, name, raw, want):
    monkeypatch.setenv(name, raw)
    if want is None:
        with pytest.raises(ValueError, match=name) as info:
            _config.read(name)
        assert "expected" in str(info.value) and repr(raw) in str(info.value)
    else:
        assert _config.read(name) == want


def test_every_mira_variable_of_the_code_is_in_the_table():
    # Every MIRA_* name the package reads at run time (a quoted name in its code) is one of _config's,
    # and none is read around the parser (os.environ / getenv with a MIRA_ name).
    import re

    files = [*ROOT.glob("mira_kernels/**/*.py"), *ROOT.glob("mira/**/*.py"), *ROOT.glob("csrc/**/*.cpp"),
             *ROOT.glob("csrc/**/*.h"), *ROOT.glob("csrc/**/*.cu"), ROOT / "setup.py"]
    text = {path: path.read_text() for path in files}
    names = {n for t in text.values() for n in re.findall(r"\"(MIRA_[A-Z_]+)\"", t)}
    assert {"MIRA_BACKEND", "MIRA_CPU_ISA", "MIRA_CPU_STREAM"} <= names <= set(_config.VARIABLES), names
    around = [str(p) for p, t in text.items() if re.search(r"(environ\.get|environ\[|getenv)\(?\s*\"MIRA_", t)]
    assert not around, around


def _small():
    return make_inputs(B=1, T=2, d_in=4, d_out=12, N=2, dtype=torch.float32)


@pytest.mark.parametrize("raw", ["2", "maybe", "enable"])
def test_check_finite_rejects_unknown_values_on_every_call(monkeypatch, raw):
    monkeypatch.setenv("MIRA_CHECK_FINITE", raw)
    inp = _small()
    with pytest.raises(ValueError, match="MIRA_CHECK_FINITE"):
        mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


def test_check_finite_accepts_every_on_spelling(monkeypatch):
    inp = _small()
    inp.keys[0, 0] = float("nan")
    for raw in ("1", "true", " ON", "Yes"):
        monkeypatch.setenv("MIRA_CHECK_FINITE", raw)
        with pytest.raises(ValueError, match="keys contains inf or NaN"):
            mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)


def test_backend_variable_accepts_case_and_spacing(monkeypatch):
    monkeypatch.setenv("MIRA_BACKEND", "  Reference\n")
    assert mk.resolve_backend("cpu") == "reference"
    monkeypatch.setenv("MIRA_BACKEND", "ref")
    with pytest.raises(ValueError, match="MIRA_BACKEND='ref' is not valid; expected reference, cpu, triton, cuda"):
        mk.resolve_backend("cpu")
    # use_backend reads a name by the same rule: ASCII whitespace only (str.strip took a no-break
    # space too, which the variable refuses).
    monkeypatch.delenv("MIRA_BACKEND")
    with mk.use_backend(" Reference\t"):
        assert mk.resolve_backend("cpu") == "reference"
    with pytest.raises(ValueError, match="unknown MIRA backend"):
        mk.use_backend("\u00a0cpu").__enter__()


@needs_ext
@pytest.mark.parametrize("name, raw, want", [c for c in CASES if c[0] in ("MIRA_CPU_STREAM", "MIRA_CPU_ISA")])
def test_the_kernel_reads_its_variables_by_the_same_rule(monkeypatch, name, raw, want):
    # Every CPU path judges both variables: N = 0 (ATen's linear), 16-bit, the adapter, the backward.
    monkeypatch.setenv(name, raw)
    inp = _small()
    calls = {
        "fp32": lambda: torch.ops.mira._cpu_mira_linear(*inp.linear_args(), inp.slice_offsets, "affine", 1.0, 0.01),
        "empty memory": lambda: torch.ops.mira._cpu_mira_linear(
            inp.x, inp.weight, None, inp.query, inp.keys[:0], inp.bank_a[:0], inp.bank_b[:0], inp.slice_offsets,
            "affine", 1.0, 0.01),
        "bf16": lambda: torch.ops.mira._cpu_mira_linear(*inp.to(torch.bfloat16, torch.float32).linear_args(),
                                                        inp.slice_offsets, "affine", 1.0, 0.01),
        "adapter": lambda: torch.ops.mira._cpu_mira_adapter_(torch.zeros(1, 2, 12), *inp.adapter_args(),
                                                             inp.slice_offsets, "affine", 1.0, 0.01),
        "backward": lambda: torch.ops.mira._cpu_mira_linear_backward(
            torch.ones(1, 2, 12), inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b, inp.slice_offsets,
            "affine", 1.0, 0.01, [True] * 5),
    }
    for path, call in calls.items():
        if want is None:
            with pytest.raises(ValueError, match=f"{name}=.* is not valid; expected") as info:
                call()
            assert raw in str(info.value), path
        elif name == "MIRA_CPU_ISA" and want != "auto" and want not in torch.ops.mira._cpu_isa_info()[1:]:
            pytest.skip(f"this CPU does not support {want}")
        else:
            call()
    if name == "MIRA_CPU_ISA" and want is not None:
        active = torch.ops.mira._cpu_isa_info()[0]
        assert active == (torch.ops.mira._cpu_isa_info()[-1] if want == "auto" else want)


@needs_ext
def test_the_kernel_sees_every_change_to_its_variables_at_the_next_call(monkeypatch):
    # The kernel reads its variables at every call (csrc/env.h): every os.environ write must reach
    # the next call, on this thread and on any other, and an invalid value must raise at every call.
    import threading

    supported = torch.ops.mira._cpu_isa_info()[1:]
    best, out = supported[-1], torch.empty(1 << 20)  # 4 MiB: streamed under auto on none of ours, forced by "1"

    def isa() -> str:
        return torch.ops.mira._cpu_isa_info()[0]

    def in_thread(fn):
        got = []
        worker = threading.Thread(target=lambda: got.append(fn()))
        worker.start()
        worker.join()
        return got[0]

    monkeypatch.delenv("MIRA_CPU_ISA", raising=False)
    monkeypatch.delenv("MIRA_CPU_STREAM", raising=False)
    assert isa() == best and in_thread(isa) == best
    monkeypatch.setenv("MIRA_CPU_ISA", "baseline")
    assert isa() == "baseline" and in_thread(isa) == "baseline"
    monkeypatch.setenv("MIRA_CPU_ISA", "bogus")
    for _ in range(2):  # an invalid value is not kept: it raises at every call
        with pytest.raises(ValueError, match="MIRA_CPU_ISA='bogus' is not valid"):
            isa()
    monkeypatch.setenv("MIRA_CPU_ISA", " BASELINE ")
    assert isa() == "baseline"
    monkeypatch.delenv("MIRA_CPU_ISA")
    assert isa() == best
    monkeypatch.setenv("MIRA_CPU_STREAM", "1")  # a new variable, another one's change
    assert torch.ops.mira._cpu_streams_into(out) and isa() == best
    monkeypatch.setenv("MIRA_CPU_STREAM", "0")
    assert not torch.ops.mira._cpu_streams_into(out) and not in_thread(lambda: torch.ops.mira._cpu_streams_into(out))


def test_build_switch_is_read_by_the_same_parser():
    code = ("import sys, runpy; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {**os.environ, "MIRA_BUILD_CUDA": "sometimes"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode != 0 and "MIRA_BUILD_CUDA='sometimes' is not valid" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Config reads under torch.compile(fullgraph=True): Dynamo calls requested_backend and
# check_finite_enabled (assume_constant_result) instead of tracing their ContextVar.get, which
# torch 2.11's Dynamo cannot trace (benchmarks/results/gpu/README.md, found on the H200 image).
# ----------------------------------------------------------------------------------------------

def _compiled_call_matches_eager():
    inp = make_inputs(B=2, T=3, d_in=8, d_out=24, N=3, dtype=torch.float32)

    def f(x, q):
        return mk.mira_linear(x, inp.weight, inp.bias, q, inp.keys, inp.bank_a, inp.bank_b,
                              slice_offsets=inp.slice_offsets)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(inp.x, inp.query)
    torch.testing.assert_close(got, f(inp.x, inp.query))


@pytest.mark.parametrize("forced", [None, "reference"])
def test_config_reads_compile_with_fullgraph(monkeypatch, forced):
    monkeypatch.setenv("MIRA_CHECK_FINITE", "off")
    with mk.use_backend(forced), mk.check_finite(False):
        _compiled_call_matches_eager()


def test_config_reads_compile_where_dynamo_cannot_trace_contextvar_get(monkeypatch):
    # torch 2.11 as far as the config is concerned: Dynamo's ContextVar.get support (2.14) removed,
    # so tracing a .get() fails a fullgraph compile ("Unsupported method call" on 2.11).
    from torch._dynamo.exc import unimplemented
    from torch._dynamo.variables import misc

    if not hasattr(misc, "ContextVarVariable"):  # an older Dynamo: the real thing, nothing to emulate
        _compiled_call_matches_eager()
        return

    def unsupported_get(self, tx, args, kwargs):
        unimplemented(gb_type="ContextVar.get unsupported (as torch 2.11)", context=self.cv_obj.name,
                      explanation="emulates a Dynamo that cannot trace ContextVar.get", hints=[])

    monkeypatch.setattr(misc.ContextVarVariable, "_handle_get", unsupported_get)
    with mk.use_backend("cpu" if _extension.has_kernel("_cpu_mira_linear", "CPU") else "reference"):
        _compiled_call_matches_eager()
    torch._dynamo.reset()


def test_a_library_built_from_other_sources_is_named(tmp_path):
    # A `git pull` without `make build` used to run the old kernels silently: setup.py now records the
    # sources' digest beside the library, and the import compares it with the checkout's.
    from mira_kernels import _extension, _sources

    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "setup.py").write_text("# build\n")
    lib = tmp_path / "lib"
    lib.mkdir()
    assert _sources.stale_note(str(tmp_path), str(lib)) is None  # no record (a wheel, an old build)
    (lib / _sources.RECORD_NAME).write_text(_sources.source_digest(str(tmp_path)) + "\n")
    assert _sources.stale_note(str(tmp_path), str(lib)) is None
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int f() { return 2; }\n")
    assert "make build" in _sources.stale_note(str(tmp_path), str(lib))
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "csrc" / "cpu" / "new.h").write_text("\n")  # an added (or deleted) file counts too
    assert _sources.stale_note(str(tmp_path), str(lib)) is not None
    if _extension.loaded:  # this checkout's own build matches its sources
        assert _extension.stale is None and _extension.build_info()["stale_sources"] is None


def test_the_makefile_rebuilds_on_the_files_the_digest_covers():
    # One list of what the build reads: the Makefile's prerequisites come from _sources.py (they
    # were a `find` of their own, which could drift from the digest the import checks).
    from mira_kernels import _sources

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run([sys.executable, os.path.join("mira_kernels", "_sources.py")], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == _sources.source_files(str(root)) and "csrc/cpu/mira_linear_cpu.cpp" in listed
    make = subprocess.run(["make", "-pn", f"PYTHON={sys.executable}", "build"], cwd=root, capture_output=True,
                          text=True)
    native = [line for line in make.stdout.splitlines() if line.startswith("NATIVE := ")]
    assert native and native[0].split(" := ", 1)[1].split() == listed
