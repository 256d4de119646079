# bemi-pg. `make deps` once (as root: apt packages), then `make test` or `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_PACKAGES := postgresql-15 postgresql-15-wal2json pgbouncer chromium
DEMO_DIR ?= .demo

.PHONY: deps test unit lint soak bench demo demo-stop install clean

deps: .stamp-apt .stamp-venv

# Debian packages: the PostgreSQL 15 server, wal2json, pgbouncer and chromium (for tests), only if missing.
.stamp-apt:
	@missing=$$(for p in $(PG_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: missing Debian packages: $$missing; run: sudo make deps" >&2; exit 1; fi; \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

.stamp-venv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install -q -e '.[test,dev,ui,browser]'
	@touch $@

test: deps
	$(BIN)/pytest tests

unit: .stamp-venv
	$(BIN)/pytest tests/unit

# The fault-injection suite with soak-sized numbers (500 kills, 20 crashes); prints the figures.
soak: deps
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

# Benchmarks (bench/README.md): ingest against raw decode (with the batch-size chart), write
# overhead under pgbench, the poller's memory, follow-mode latency, time travel on 5M changes.
bench: deps
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/ingest.py --rounds 3 --chart bench/batch-size.png
	$(BIN)/python bench/pgbench_overhead.py --seconds 6 --rounds 3
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/latency.py --tps 500 --seconds 20
	$(BIN)/python bench/timetravel.py --rows 5000000 --samples 200

lint: .stamp-venv
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# A throwaway server in $(DEMO_DIR), Bemi's README example replayed, the changes printed.
demo: deps
	$(BIN)/python -m bemi_pg._demo $(DEMO_DIR)

demo-stop:
	@if [ -d $(DEMO_DIR)/data ]; then $(BIN)/python -m bemi_pg._localpg stop $(DEMO_DIR)/data; fi

# Install into the database named by DATABASE_URL (or libpq's PG* variables).
install: .stamp-venv
	$(BIN)/bemi-pg install

clean: demo-stop
	rm -rf $(VENV) $(DEMO_DIR) .stamp-* build dist src/*.egg-info
