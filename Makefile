# bemi-pg. `make deps` once (as root: apt packages), then `make test` or `make demo`.
# PG=17 or PG=18 (`make deps test PG=17`): the throwaway clusters, pg_regress, pgbench and the
# extension build come from a Debian root that scripts/pgroot.sh prepares (or reuses); 15, the
# default, is this host's own postgresql-15.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG ?= 15
HOST_PG := 15
ifeq ($(PG),$(HOST_PG))
# postgresql-N-cron: pg_cron, for the test that schedules trigger mode's mover (bemi.move_changes)
PG_PACKAGES := postgresql-$(PG) postgresql-$(PG)-wal2json postgresql-$(PG)-cron pgbouncer
PG_ENV := BEMI_PG_MAJOR=$(PG)
PG_ROOT_DEPS :=
else
PG_PACKAGES := pgbouncer
PG_ENV = BEMI_PG_MAJOR=$(PG) BEMI_PG_ROOT=$$(scripts/pgroot.sh $(PG))
PG_ROOT_DEPS := pgroot
endif
# prometheus: for promtool, which checks and unit-tests the alert rules in docs/alerts.yml
# chromium: the explorer's browser tests (Playwright drives Debian's build; no browser download)
APT_PACKAGES := $(PG_PACKAGES) prometheus chromium
DEMO_DIR ?= .demo

.PHONY: deps pgroot test unit lint soak bench demo demo-stop install clean

deps: .stamp-apt-$(PG) .stamp-venv $(PG_ROOT_DEPS)

# PostgreSQL $(PG) in a Debian root (about 70 s the first time; reused after).
pgroot:
	scripts/pgroot.sh $(PG)

# Debian packages: the PostgreSQL 15 server, wal2json, pgbouncer, promtool and chromium (for tests; all but
# the server and wal2json also for PG=17|18), only if missing.
.stamp-apt-$(PG):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: missing Debian packages: $$missing; run: sudo make deps" >&2; exit 1; fi; \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

.stamp-venv: pyproject.toml src/bemi_pg/_fastrow.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install -q -e '.[test,dev,metrics,progress,ui,browser]'
	@touch $@

test: deps
	$(PG_ENV) $(BIN)/pytest tests

unit: .stamp-venv
	$(BIN)/pytest tests/unit

# The fault-injection suite with soak-sized numbers (500 kills, 20 crashes); prints the figures.
soak: deps
	$(PG_ENV) $(BIN)/python scripts/soak.py $(SOAK_ARGS)

# Benchmarks (bench/README.md): ingest against raw decode (with the batch-size chart), write
# overhead under pgbench, the poller's memory, follow-mode latency, time travel on 5M changes.
bench: deps
	$(BIN)/pip install -q -e '.[bench]'
	$(PG_ENV) $(BIN)/python bench/ingest.py --rounds 3 --chart bench/batch-size.png
	$(PG_ENV) $(BIN)/python bench/pgbench_overhead.py --seconds 6 --rounds 3
	$(PG_ENV) $(BIN)/python bench/memory.py
	$(PG_ENV) $(BIN)/python bench/latency.py --tps 500 --seconds 20
	$(PG_ENV) $(BIN)/python bench/timetravel.py --rows 5000000 --samples 200

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
