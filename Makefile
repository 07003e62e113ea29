# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SOCKET := .run/taskd.sock
EXAMPLE_PAYLOAD := {"to": "ada@example.com", "subject": "Hello", "body": "Welcome!"}

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
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

# Measurements quoted in the issues' closing notes; each script prints what it measured.
# The scheduler's takes about five minutes; fewer ticks: make bench CRON_ARGS="--ticks 30"
bench: install
	$(BIN)/python tests/bench/cli_latency.py
	$(BIN)/python -m tests.bench.cron_lateness $(CRON_ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
