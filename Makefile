# Everyday targets. The README's two commands are `make bench` and `make test`: each sets up
# the pinned virtual environment and the build when they are missing or stale, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .stamps
# What the build reads (native sources and the Python files it runs): mira_kernels/_sources.py lists them.
NATIVE := $(shell $(PYTHON) mira_kernels/_sources.py 2>/dev/null)

.PHONY: setup build test test-slow bench demo lint clean gpu-check fuzz sanitize cross-aarch64
.DEFAULT_GOAL := test

setup: $(STAMPS)/venv
build: $(STAMPS)/build

# pyvenv.cfg, not bin/python (a symlink whose time is the system python's): a deleted .venv is made
# again, and being newer than the stamp, gets its packages installed again.
$(VENV)/pyvenv.cfg:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	    { echo "$(PYTHON) is $$($(PYTHON) -V 2>&1); mira-kernels needs Python 3.10 or newer (make PYTHON=python3.11 ...)"; exit 1; }
	@mkdir -p $(STAMPS)
	flock $(STAMPS)/venv.lock $(PYTHON) -m venv $(VENV)

$(STAMPS)/venv: requirements.txt $(VENV)/pyvenv.cfg
	@mkdir -p $(STAMPS)
	flock $(STAMPS)/venv.lock $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# The build switches the extension was built with (README) and the list of native sources: a change
# of either rebuilds it (a deleted source leaves no newer file behind). The file is rewritten only
# when its content changes, so an unchanged configuration rebuilds nothing.
BUILD_CONFIG = MIRA_BUILD_CUDA=$(MIRA_BUILD_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) \
	CI_CUDA_ARCHS=$(CI_CUDA_ARCHS) SOURCES=$(sort $(NATIVE))
$(STAMPS)/build-config: FORCE
	@mkdir -p $(STAMPS)
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@
.PHONY: FORCE
FORCE:

# Without a GPU (CI) the CUDA sources are only compile-checked: one architecture (sm_90) instead of
# setup.py's default list (sm_80, sm_90, PTX) saves ~19 s of nvcc on a 2-core Zen 3 (40.7 vs 59.4 s
# for mira_cuda.cu), more on slower CI machines. A machine with a GPU, or an explicit
# TORCH_CUDA_ARCH_LIST, builds what setup.py says.
CI_CUDA_ARCHS := $(if $(TORCH_CUDA_ARCH_LIST),,$(shell nvidia-smi -L >/dev/null 2>&1 || echo 9.0))

# flock: several shells (or helpers) may ask for a build at once; ninja's build dir is shared.
$(STAMPS)/build: $(STAMPS)/venv $(STAMPS)/build-config pyproject.toml mira_kernels/_sources.py $(NATIVE)
	flock $(STAMPS)/build.lock env MAX_JOBS=$${MAX_JOBS:-2} $(if $(CI_CUDA_ARCHS),TORCH_CUDA_ARCH_LIST=$(CI_CUDA_ARCHS)) \
	    $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

# Tests marked `slow` (AOTInductor compiles, ~30-90 s each) run in `make test-slow`, not in CI.
test: build
	$(PY) -m pytest -q -m "not slow" tests

test-slow: build
	$(PY) -m pytest -q -m slow tests

bench: build
	$(PY) -m benchmarks.latency

demo: build
	$(PY) -m mira_kernels.demo

# For a lent GPU machine: the machine's own python3 builds and checks everything, nothing is
# installed (benchmarks/gpu_check.py). GPU_CHECK_ARGS: e.g. --dry-run, --record, --phases op,model.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# The property suite's long profile (tests/fuzz/profiles.py): random examples by the thousand on
# the reference and cpu backends, a few hundred on the Triton backend under the interpreter, and
# random sequences of mutating calls. Failing examples are kept in .hypothesis/ and replayed first.
# FUZZ_ARGS: extra pytest arguments (e.g. -k cpu).
fuzz: build
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/test_properties.py $(FUZZ_ARGS)

# The C++ CPU kernel built with AddressSanitizer + UndefinedBehaviorSanitizer, then the tests that drive
# the C++ ops run against it, libasan preloaded into python (it must be the first library loaded). Not
# part of CI (several times slower). The build and the run happen in a copy of the sources,
# build/sanitize/tree, with the sanitized _C*.so in place of the normal one: pytest puts the tree that
# holds tests/ first on sys.path, and child processes started by the tests get that tree as PYTHONPATH,
# so a copy is the one layout in which every import of mira_kernels (parent and children) is the
# sanitized build. The normal build is untouched. --capture=sys: sanitizer reports are written to fd 2,
# which pytest's default (fd) capture would swallow when the process aborts. SAN_TESTS / SAN_ARGS
# narrow the run (e.g. SAN_TESTS=tests/test_hostile_ops.py).
SAN_DIR := build/sanitize
SAN_TREE := $(SAN_DIR)/tree
SAN_TESTS ?= tests/test_hostile_ops.py tests/test_validation.py tests/test_cpu_kernel.py tests/test_ops.py \
	tests/test_reference.py tests/test_routing.py tests/test_mira_memory.py tests/test_transactional.py \
	tests/test_config_env.py tests/test_properties.py
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: setup
	rm -rf $(SAN_TREE) && mkdir -p $(SAN_TREE)
	cp -rp mira_kernels mira benchmarks tests csrc setup.py pyproject.toml Makefile requirements.txt $(SAN_TREE)/
	find $(SAN_TREE) \( -name '_C*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	cd $(SAN_TREE) && MIRA_SANITIZE=1 MIRA_BUILD_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} "$(CURDIR)/$(PY)" setup.py -q \
	    build_ext --inplace --build-temp "$(CURDIR)/$(SAN_DIR)/temp"
	cd $(SAN_TREE) && PYTHONPATH="$(CURDIR)/$(SAN_TREE)" $(SAN_ENV) "$(CURDIR)/$(PY)" -m pytest -q -p no:cacheprovider \
	    --capture=sys $(SAN_TESTS) -k "not triton" $(SAN_ARGS)

# Every C++ source compiled for aarch64 with Debian's cross compiler (apt-get install
# g++-aarch64-linux-gnu); `make test` checks only the architecture-specific files (minutes vs seconds).
cross-aarch64: setup
	CROSS_COMPILE_ALL=1 $(PY) -m pytest -q tests/test_cross_aarch64.py

lint: setup
	$(PY) -m ruff check mira_kernels mira benchmarks tests

clean:
	rm -rf build $(STAMPS) mira_kernels/_C*.so *.egg-info
