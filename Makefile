# The two commands: `make run` serves Serai, `make test` runs the whole suite.
# Both create .venv on first use; llama-cpp-python compiles from source then (~5-8 minutes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "Installing Serai into $(VENV) (llama-cpp-python compiles on the first run)..."
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	@touch $@

# The benchmarks also run `python -m llama_cpp.server`, whose extra dependencies live in [bench].
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[bench]'
	@touch $@

run: $(VENV)/.installed
	$(BIN)/serai serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check serai tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Speed against llama_cpp.server and a bare loop, then memory, then the gateway's overhead in
# front of a mock upstream (about 27 minutes on 2 cores; run it on an otherwise idle machine).
bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/embedded_engine.py
	$(BIN)/python benchmarks/engine_memory.py
	$(BIN)/python benchmarks/gateway_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
