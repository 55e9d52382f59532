# ingestor — developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit kafka-fetch kafka-up kafka-down bench bench-emulator soak clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

kafka-fetch: setup
	$(BIN)/ingestor kafka fetch

kafka-up: kafka-fetch
	$(BIN)/ingestor kafka up

kafka-down: setup
	$(BIN)/ingestor kafka down

## The main job on the embedded default: local Kafka + Stripe emulator + sample traffic + the worker.
demo: kafka-fetch
	$(BIN)/ingestor demo

lint: setup
	$(BIN)/ruff check ingestor tests bench scripts
	$(BIN)/ruff format --check ingestor tests bench scripts

typecheck: setup
	$(BIN)/mypy

## The whole test suite: lint, types, deploy checks, unit and integration tests on a real broker.
test: kafka-fetch lint typecheck
	bash scripts/check-deploy.sh
	$(BIN)/pytest

bench-emulator: setup
	$(BIN)/python bench/emulator_bench.py

bench: kafka-fetch
	$(BIN)/python bench/pipeline_bench.py

## Not in CI: ~30 minutes at half capacity with faults cycling, the worker's RSS over time, the accounting.
SOAK_MINUTES ?= 30
soak: kafka-fetch
	$(BIN)/python -m tests.chaos.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
