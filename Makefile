# Idempotency Lab. `make` alone lists the targets; every target sets up .venv itself if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MUTANT_TOOLS := $(VENV)/.mutants-installed

.DEFAULT_GOAL := help
.PHONY: help test soundness test-matrix test-install compare-frontrun matrix test-docker lint bench soak mutants clean

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

test: $(STAMP) lint ## lint, then the whole suite against a real PostgreSQL (but the matrix's slow cells, the install leg)
	$(BIN)/python -m pytest -m "not matrix and not install and not soundness"

soundness: $(STAMP) ## the reduced search against the full one at 3 sessions, outcome for outcome (minutes)
	$(BIN)/python -m pytest -m soundness tests/test_reduction.py -s

test-install: $(STAMP) ## pip install the checkout into a fresh venv beside examples/orders, then pytest there
	$(BIN)/python -m pytest -m install

compare-frontrun: $(STAMP) ## the example's first test under the lab's plugin and frontrun 0.7.0 (a throwaway venv)
	$(BIN)/python examples/orders/frontrun/compare.py

test-matrix: $(STAMP) ## every cell of the isolation matrix against lab/journeys/matrix.toml (about a minute)
	$(BIN)/python -m pytest -m matrix

matrix: $(STAMP) ## would REPEATABLE READ or SERIALIZABLE have saved you? every scenario at every level
	$(BIN)/lab matrix

test-docker: $(STAMP) ## the container leg: the lab on testcontainers (as root, a private Docker daemon if none answers)
	@bash tests/container/leg.sh

lint: $(STAMP) ## ruff and mypy (strict)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP) ## the lab's speed against its floors (prints a table, writes bench/results.json)
	$(BIN)/python -m lab.bench

soak: $(STAMP) ## every lab command ended by SIGINT and SIGTERM, 50 times each way (~15 min)
	$(BIN)/python tests/soak.py

$(MUTANT_TOOLS): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,mutants]'
	@touch $(MUTANT_TOOLS)

mutants: $(MUTANT_TOOLS) ## break fixes/*.py on purpose, grade each mutant with lab check: kill rate per scenario
	$(BIN)/python -m lab.mutants

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info mutants
