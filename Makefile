# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
# `make test-oldest` sets VENV=.venv-oldest LOWEST=1: the same checks on the lowest versions
# the dependency ranges in pyproject.toml allow (CI runs both).
VENV ?= .venv
LOWEST ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SOCKET := .run/taskd.sock
EXAMPLE_PAYLOAD := {"to": "ada@example.com", "subject": "Hello", "body": "Welcome!"}

.PHONY: install run test test-oldest lint bench clean schema

$(STAMP): pyproject.toml .ci/lowest-versions
	$(PYTHON) -m venv $(VENV)
	$(if $(LOWEST),$(PYTHON) .ci/lowest-versions pyproject.toml > $(VENV)/constraints.txt)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		$(if $(LOWEST),-c $(VENV)/constraints.txt) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Start taskd on the example tasks (SQLite in .run/), show taskctl working, keep it running.
run: install
	@$(BIN)/taskd --config contrib/examples/taskd.toml & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid; exit 0' INT TERM; \
	set -e; \
	echo '$$ taskctl list'; \
	$(BIN)/taskctl --socket $(SOCKET) --connect-timeout 15s list; \
	echo; echo '$$ taskctl run jobs:send-email --payload ...'; \
	$(BIN)/taskctl --socket $(SOCKET) run jobs:send-email --payload '$(EXAMPLE_PAYLOAD)'; \
	echo; echo "taskd is running (pid $$pid). In another shell:"; \
	echo "  export TASKD_SOCKET=$(CURDIR)/$(SOCKET)"; \
	echo "  $(BIN)/taskctl status"; \
	echo "Ctrl-C stops it."; \
	wait $$pid

lint: install
	$(BIN)/ruff check taskd taskctl tests
	$(BIN)/ruff format --check taskd taskctl tests
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

test-oldest:
	$(MAKE) --no-print-directory test VENV=.venv-oldest LOWEST=1

# contrib/protocol.schema.json is generated from the wire types; a test fails when it is stale.
schema: install
	$(BIN)/python -m taskd.schema > contrib/protocol.schema.json

# Measurements quoted in the issues' closing notes; each script prints what it measured.
# The scheduler's takes about five minutes; fewer ticks: make bench CRON_ARGS="--ticks 30"
bench: install
	$(BIN)/python tests/bench/cli_latency.py
	$(BIN)/python -m tests.bench.cron_lateness $(CRON_ARGS)

clean:
	rm -rf .venv .venv-oldest .run .pytest_cache .mypy_cache .ruff_cache
