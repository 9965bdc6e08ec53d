"""Builds mira_kernels._C: the op schemas and the C++ CPU kernel always, CUDA kernels when possible.

Install without build isolation so the torch already in the environment is built against and
not reinstalled:  ``pip install --no-build-isolation -e .``  (the Makefile does this).

Switches (environment variables, read here only):
  MIRA_BUILD_CUDA       auto (default): build csrc/cuda/*.cu if nvcc and a CUDA build of torch exist;
                        1: require the CUDA part (fail if impossible);  0: skip it.
  MIRA_SANITIZE         1: build with AddressSanitizer + UndefinedBehaviorSanitizer (`make sanitize`).
  (Both are read by the parser of every MIRA_* variable, mira_kernels/_config.py.)
  TORCH_CUDA_ARCH_LIST  GPU targets; default "8.0;9.0+PTX" (sm_80, sm_90, and PTX for newer GPUs).
  MAX_JOBS              parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in an editable install.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _load_by_path(name: str, relative: str):
    # Package files loaded by path: importing the package would load the extension this script is
    # about to build.
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _read_env(name: str) -> str:
    # The one parser of every MIRA_* variable (mira_kernels/_config.py).
    config = _load_by_path("_mira_config", os.path.join("mira_kernels", "_config.py"))
    try:
        return config.read(name)
    except ValueError as err:
        sys.exit(str(err))


def _cuda_decision(torch, cpp_extension) -> tuple[bool, str]:
    mode = _read_env("MIRA_BUILD_CUDA")
    if mode == "0":
        return False, "skipped (MIRA_BUILD_CUDA=0)"
    missing = []
    if not _sources("csrc/cuda/*.cu"):
        missing.append("no csrc/cuda/*.cu sources")
    if torch.version.cuda is None:
        missing.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit (nvcc) found")
    if missing:
        if mode == "1":
            sys.exit("MIRA_BUILD_CUDA=1 but the CUDA part cannot be built: " + "; ".join(missing))
        return False, "not built: " + "; ".join(missing)
    return True, f"built with {cpp_extension.CUDA_HOME} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"


def _extensions():
    # torch derives CUDA_HOME from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc makes that
    # /usr/local, where libcudart is missing and the link fails. Prefer the standard toolkit prefix.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    with_cuda, cuda_note = _cuda_decision(torch, cpp_extension)

    cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # No -march=native: a wheel built here must run on any x86-64. The CPU kernel compiles its
    # hot loops once per instruction set (function target attributes) and picks one at run time.
    # -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h) and runs serially in a file compiled
    # without it; linking resolves libgomp.so.1 to the copy torch has already loaded.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if _read_env("MIRA_SANITIZE") == "1":
        # `make sanitize`: AddressSanitizer + UndefinedBehaviorSanitizer, and signed overflow
        # undefined again (-fno-wrapv over Python's -fwrapv) so that UBSan reports it.
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1", "-g", "-fno-wrapv", *sanitizers]
        link_flags += sanitizers
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="mira_kernels._C", include_dirs=include_dirs, py_limited_api=False,
                  extra_link_args=link_flags)
    if with_cuda:
        cu_sources = _sources("csrc/cuda/*.cu")
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            sources=cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DMIRA_WITH_CUDA"], "nvcc": nvcc_flags + ["-DMIRA_WITH_CUDA"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)

    print(
        "mira_kernels build configuration:\n"
        f"  torch        {torch.__version__} (CUDA {torch.version.cuda})\n"
        f"  C++ sources  {', '.join(cpp_sources)}\n"
        f"  CUDA part    {cuda_note}\n"
        f"  C++ flags    {' '.join(cxx_flags)}",
        flush=True,
    )
    sources = _load_by_path("_mira_sources", os.path.join("mira_kernels", "_sources.py"))

    class BuildAndRecord(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """The build, then the digest of its sources beside the library (mira_kernels/_sources.py)."""

        def run(self):
            super().run()
            library_dir = os.path.dirname(self.get_ext_fullpath("mira_kernels._C"))
            with open(os.path.join(library_dir, sources.RECORD_NAME), "w") as f:
                f.write(sources.source_digest(ROOT) + "\n")

    return [ext], BuildAndRecord


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
