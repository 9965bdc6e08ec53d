# Everyday targets. The README's two commands are `make bench` and `make test`: each sets up
# the pinned virtual environment and the build when they are missing or stale, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .stamps
NATIVE := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.inc' 2>/dev/null)

.PHONY: setup build test bench demo lint clean gpu-check
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

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.latency

demo: build
	$(PY) -m mira_kernels.demo

# For a lent GPU machine: the machine's own python3 builds and checks everything, nothing is
# installed (benchmarks/gpu_check.py). GPU_CHECK_ARGS: e.g. --dry-run, --record, --phases op,model.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: setup
	$(PY) -m ruff check mira_kernels mira benchmarks tests

clean:
	rm -rf build $(STAMPS) mira_kernels/_C*.so *.egg-info
