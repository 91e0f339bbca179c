# Every target creates or updates .venv first: nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(HASH)
BENCH_STAMP := $(VENV)/.bench-$(HASH)
PROMTOOL := $(VENV)/tools/promtool

.PHONY: run test browser lint bench bench-queue bench-seed bench-reports bench-exports bench-dashboard bench-analytics bench-maintenance bench-api bench-api-refusal bench-monitoring bench-tracing bench-failover bench-chaos clean

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

test: $(STAMP) browser $(PROMTOOL)
	$(BIN)/python -m pytest -q

# The browser tests drive Debian's chromium headless: installed here where apt-get can, quietly, once.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the browser tests will skip (fail under SALESDASH_REQUIRE_BROWSER=1)"

# promtool for the deploy/ checks (tests/test_deploy.py): the system's, else taken out of Debian's prometheus
# package, downloaded and unpacked, not installed (no Prometheus service is started). Quiet; once it is there
# nothing is fetched again; without it those checks skip.
$(PROMTOOL): | $(STAMP)
	@mkdir -p $(VENV)/tools
	@if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d) && chmod 755 $$tmp && cd $$tmp && \
	  { apt-get download -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq prometheus >/dev/null 2>&1; }; } && \
	  dpkg-deb -x prometheus_*.deb unpacked && cp unpacked/usr/bin/promtool $(CURDIR)/$@; \
	  cd $(CURDIR) && rm -rf $$tmp; \
	fi; test -x $@ || echo "promtool unavailable: tests/test_deploy.py skips its promtool checks"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy salesdash db worker api cli
	$(BIN)/mypy tests

bench: bench-queue bench-seed bench-reports bench-exports bench-dashboard bench-analytics bench-maintenance bench-api bench-api-refusal bench-monitoring bench-tracing

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
	@command -v wrk >/dev/null || apt-get install -y -q wrk
	$(BIN)/python bench/analytics.py

bench-maintenance: $(BENCH_STAMP)
	$(BIN)/python bench/maintenance.py

bench-api: $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/api.py

bench-monitoring: $(BENCH_STAMP)
	$(BIN)/python bench/monitoring.py

bench-tracing: $(STAMP)
	$(BIN)/python bench/tracing.py

bench-failover: $(BENCH_STAMP)
	$(BIN)/python bench/failover.py

bench-chaos: $(BENCH_STAMP)
	$(BIN)/python bench/chaos.py

bench-api-refusal: $(BENCH_STAMP)
	$(BIN)/python bench/api_refusal.py

clean:
	rm -rf $(VENV) .salesdash .pytest_cache .mypy_cache .ruff_cache
