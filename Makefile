# Everyday targets. The README's two commands are `make bench` and `make test`: each sets up
# the pinned virtual environment and the build when they are missing or stale, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .stamps
NATIVE := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.inc' 2>/dev/null)

.PHONY: setup build test test-slow bench demo lint clean gpu-check fuzz sanitize cross-aarch64
.DEFAULT_GOAL := test

setup: $(STAMPS)/venv
build: $(STAMPS)/build

$(STAMPS)/venv: requirements.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# flock: several shells (or helpers) may ask for a build at once; ninja's build dir is shared.
$(STAMPS)/build: $(STAMPS)/venv setup.py pyproject.toml $(NATIVE)
	flock $(STAMPS)/build.lock env MAX_JOBS=$${MAX_JOBS:-2} \
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

# The C++ CPU kernel built with AddressSanitizer + UndefinedBehaviorSanitizer in its own folder
# (build/sanitize: the normal build is untouched), then the tests that drive the C++ ops run
# against it, libasan preloaded into python. Not part of CI (several times slower).
SAN_DIR := build/sanitize
SAN_TESTS ?= tests/test_hostile_ops.py tests/test_validation.py tests/test_cpu_kernel.py tests/test_ops.py \
	tests/test_reference.py tests/test_routing.py tests/test_mira_memory.py tests/test_transactional.py \
	tests/test_config_env.py tests/test_properties.py
sanitize: setup
	rm -rf $(SAN_DIR)/lib/mira_kernels && mkdir -p $(SAN_DIR)/lib/mira_kernels
	cp -rs $(CURDIR)/mira_kernels/. $(SAN_DIR)/lib/mira_kernels/ && rm -f $(SAN_DIR)/lib/mira_kernels/_C*.so
	MIRA_SANITIZE=1 MIRA_BUILD_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext \
	    --build-lib $(SAN_DIR)/lib --build-temp $(SAN_DIR)/temp
	PYTHONPATH=$(CURDIR)/$(SAN_DIR)/lib:$(CURDIR) LD_PRELOAD="$$(gcc -print-file-name=libasan.so) \
	    $$(gcc -print-file-name=libubsan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(PY) -m pytest -q -p no:cacheprovider $(SAN_TESTS) -k "not triton" $(SAN_ARGS)

# Every C++ source compiled for aarch64 with Debian's cross compiler (apt-get install
# g++-aarch64-linux-gnu); `make test` checks only the architecture-specific files (minutes vs seconds).
cross-aarch64: setup
	CROSS_COMPILE_ALL=1 $(PY) -m pytest -q tests/test_cross_aarch64.py

lint: setup
	$(PY) -m ruff check mira_kernels mira benchmarks tests

clean:
	rm -rf build $(STAMPS) mira_kernels/_C*.so *.egg-info
