# Every target creates or updates .venv first: nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(HASH)
BENCH_STAMP := $(VENV)/.bench-$(HASH)

.PHONY: run test lint bench bench-queue bench-seed bench-reports bench-exports bench-dashboard bench-analytics bench-maintenance bench-api bench-api-refusal clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@rm -f $(VENV)/.bench-*
	@touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/salesdash up

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy salesdash db worker api cli
	$(BIN)/mypy tests

bench: bench-queue bench-seed bench-reports bench-exports bench-dashboard bench-analytics bench-maintenance bench-api bench-api-refusal

bench-queue: $(BENCH_STAMP)
	$(BIN)/python bench/queue.py

bench-seed: $(BENCH_STAMP)
	$(BIN)/python bench/seed.py

bench-reports: $(BENCH_STAMP)
	$(BIN)/python bench/reports.py

bench-exports: $(BENCH_STAMP)
	$(BIN)/python bench/exports.py

bench-dashboard: $(BENCH_STAMP)
	$(BIN)/python bench/dashboard.py

bench-analytics: $(BENCH_STAMP)
	$(BIN)/python bench/analytics.py

bench-maintenance: $(BENCH_STAMP)
	$(BIN)/python bench/maintenance.py

bench-api: $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/api.py

bench-api-refusal: $(BENCH_STAMP)
	$(BIN)/python bench/api_refusal.py

clean:
	rm -rf $(VENV) .salesdash .pytest_cache .mypy_cache .ruff_cache
