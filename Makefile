# Idempotency Lab. `make` alone lists the targets; every target sets up .venv itself if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help test lint bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_%-]+:.*## / {gsub("%", "N", $$1); printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

scenario-%: $(STAMP) ## watch scenario N's race, then its fix under the same attack (N = 1..4)
	$(BIN)/lab run $*

check-%: $(STAMP) ## grade your fix of scenario N; FILE=... (default workshop/<scenario>.py)
	$(BIN)/lab check $* $(FILE)

test: $(STAMP) lint ## lint, then the whole suite against a real PostgreSQL
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff and mypy (strict)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP) ## the lab's speed against its floors (prints a table, writes bench/results.json)
	$(BIN)/python -m lab.bench

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
