# cvops — common commands. `make demo` sets everything up and runs the demo; `make test` tests.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/full_flow.yaml
PYTEST_ARGS ?=
# Debian packages of the tests and of the local stack (cvops up)
SYSTEM_PACKAGES := postgresql nginx prometheus prometheus-node-exporter chromium chromium-driver

.PHONY: setup system-deps setup-stack demo demo-stack test test-fast lint format lock bench bench-accuracy clean-demo

$(STAMP): pyproject.toml requirements.lock
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"cvops needs Python 3.11, found {sys.version}"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $@

setup: $(STAMP)  ## create .venv and install cvops with the locked dependencies

system-deps:  ## Debian packages the tests need (PostgreSQL 15, nginx, Prometheus, Chromium), where missing
	scripts/install-system-deps.sh $(SYSTEM_PACKAGES)

setup-stack:  ## Debian packages of the local full stack (cvops up), where missing
	scripts/install-system-deps.sh $(SYSTEM_PACKAGES)

demo: setup  ## generate the DVC demo dataset and run the full flow
	$(BIN)/cvops data demo-repo
	$(BIN)/cvops run $(CONFIG)

demo-stack: setup setup-stack  ## cvops up, the full flow on the stack, traffic, drift, where to look
	$(BIN)/cvops up
	$(BIN)/cvops data demo-repo
	$(BIN)/cvops run $(CONFIG)
	$(BIN)/python scripts/demo_stack.py

# The suite waits on servers about as much as it computes: 2 pytest-xdist workers, each test
# file one unit of work (its module fixtures built once), slow files first (tests/conftest.py).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup system-deps  ## the whole test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup system-deps  ## tests without the slow end-to-end ones
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# e.g. BENCH_SERVE_ARGS="--skip-reference --workers 1"; --baseline DIR (default ../shared/baselines/reference_dl_service)
BENCH_SERVE_ARGS ?=
.PHONY: bench-serve
bench-serve: setup  ## serving benchmark: reference service vs cvops serve, compute floor -> benchmarks/results/serve.md (< 10 min on 2 cores)
	$(BIN)/python benchmarks/serve.py $(BENCH_SERVE_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks scripts run_flow.py

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format src tests benchmarks scripts run_flow.py

lock:  ## re-resolve requirements.lock from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra kubernetes --python-version 3.11 -o requirements.lock

bench: setup
	$(BIN)/python benchmarks/train_input.py

bench-accuracy: setup  ## accuracy per backbone at a fixed CPU budget -> benchmarks/results/accuracy.md (~1 h on 2 cores)
	nice -n 19 $(BIN)/python benchmarks/accuracy.py

# e.g. BENCH_DRIFT_CAUSE_ARGS="--windows 5 --out /tmp/drift_cause.md" for a smoke run
BENCH_DRIFT_CAUSE_ARGS ?=
.PHONY: bench-drift-cause
bench-drift-cause: setup  ## is the injected drift cause ranked first? every shift scenario on fresh images -> benchmarks/results/drift_cause.md (~30 min on 2 cores)
	nice -n 10 $(BIN)/python benchmarks/drift_cause.py $(BENCH_DRIFT_CAUSE_ARGS)

clean-demo:  ## remove the demo's data and results (datasets/, central_storage/, .cvops/)
	rm -rf datasets central_storage .cvops
