# Everything a new machine needs goes through these targets (see README).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEV_STAMP := $(VENV)/.vcp-dev.stamp

.PHONY: setup vllm vllm-next demo lint test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when a pyproject.toml changes.  The example patch package
# (examples/patch-package) is installed too: the test suite runs its own tests.
$(DEV_STAMP): pyproject.toml examples/patch-package/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps -e examples/patch-package
	touch $@

setup: $(DEV_STAMP)

# Real vLLM (CPU build) and what it needs; the script skips when its inputs are unchanged.
vllm: setup
	scripts/install-vllm.sh $(VENV)

# The vLLM releases after the installed one, as wheels read statically by `doctor --vllm`
# (the compatibility matrix, the upgrade routine and the no-vLLM tests use them); not installed.
VLLM_NEXT ?= 0.33.0 0.34.0
vllm-next: setup
	for version in $(VLLM_NEXT); do scripts/fetch-vllm-wheel.sh $(VENV) $$version || exit 1; done

demo: vllm
	$(BIN)/python examples/scheduler_demo.py

# Style and types, configured in pyproject.toml ([tool.ruff], [tool.mypy]): ruff's rules and
# its formatting, then mypy --strict over the package, the catalogue and the example patch
# package, against the installed vLLM (hence `vllm`: the catalogue is typed as vLLM's classes).
LINT_PATHS := src patches tests examples benchmarks
lint: vllm
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Lint first (about 15 s cold, 3 s warm; a finding fails CI before any test runs), then the fast tests
# (unit tests, then the real-vLLM ones that start no engine; -x: the first failure
# stops CI within seconds to a minute), then the tests that start real vLLM engines
# and servers.  Together they are every test exactly once.  Each run must select
# tests: pytest's exit code 5 (nothing collected) fails the target like any other
# non-zero code, so a selection that matches nothing never passes as green.
test: vllm vllm-next lint
	$(BIN)/python -m pytest -m "not slow" -x
	$(BIN)/python -m pytest -m slow

test-fast: vllm
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Benchmarks (see benchmarks/): needs the 'bench' extra on top of the dev install.
BENCH_STAMP := $(VENV)/.vcp-bench.stamp

$(BENCH_STAMP): pyproject.toml | $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

.PHONY: bench
bench: vllm $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py
