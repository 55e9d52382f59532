# ingestor — developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCKS := requirements/build.lock requirements/dev.lock
# Installs refuse any file whose sha256 is not in the lock (see scripts/lock.sh).
PIP_LOCKED := $(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps

.PHONY: setup lock lock-upgrade demo test lint typecheck unit kafka-fetch kafka-up kafka-down bench bench-emulator bench-dlq soak clean

## A virtualenv with exactly the locked versions (requirements/dev.lock), then the project itself, editable,
## and the development tools (ingestor_dev/) beside it.
$(STAMP): pyproject.toml $(LOCKS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r requirements/build.lock
	$(PIP_LOCKED) -r requirements/dev.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# The development tools (ingestor_dev/) are not in the distribution: the repository root on the path finds them.
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ingestor-dev.pth"
	touch $(STAMP)

setup: $(STAMP)

## Re-resolve the lock files after editing pyproject.toml or requirements/*.in (pins that still fit are kept).
lock: setup
	bash scripts/lock.sh

## Move every locked package to its newest allowed version.
lock-upgrade: setup
	bash scripts/lock.sh --upgrade

kafka-fetch: setup
	$(BIN)/ingestor kafka fetch

kafka-up: kafka-fetch
	$(BIN)/ingestor kafka up

## Stops the broker and deletes its data (topics, records, offsets); `make kafka-down KEEP_DATA=1` keeps it.
kafka-down: setup
	$(BIN)/ingestor kafka down $(if $(KEEP_DATA),--keep-data)

## The main job on the embedded default: local Kafka + Stripe emulator + sample traffic + the worker.
demo: kafka-fetch
	$(BIN)/ingestor demo

## ruff, then the architecture's import contracts ([tool.importlinter] in pyproject.toml).
lint: setup
	$(BIN)/ruff check ingestor ingestor_dev tests bench scripts
	$(BIN)/ruff format --check ingestor ingestor_dev tests bench scripts
	$(BIN)/lint-imports

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

## Exactly-once dead letters (INGESTOR_DLQ_TRANSACTIONAL=true) against at-least-once, 1 % and 10 % invalid.
bench-dlq: kafka-fetch
	$(BIN)/python bench/dlq_cost.py --invalid-fraction 0.01 --invalid-fraction 0.1 --repeat 2

## Not in CI: ~30 minutes at half capacity with faults cycling, the worker's RSS over time, the accounting.
SOAK_MINUTES ?= 30
soak: kafka-fetch
	$(BIN)/python -m tests.chaos.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache build *.egg-info
