# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
# `make test-oldest` sets VENV=.venv-oldest LOWEST=1: the same checks on the lowest versions
# the dependency ranges in pyproject.toml allow (CI runs both).
VENV ?= .venv
LOWEST ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-oldest test-systemd lint bench clean schema

$(STAMP): pyproject.toml .ci/lowest-versions
	$(PYTHON) -m venv $(VENV)
	$(if $(LOWEST),$(PYTHON) .ci/lowest-versions pyproject.toml > $(VENV)/constraints.txt)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		$(if $(LOWEST),-c $(VENV)/constraints.txt) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# `make run` needs taskd alone, not the test tools.
$(VENV)/.run-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

# Start taskd on the example tasks (SQLite in .run/), show taskctl working, keep it running;
# if taskd cannot start, its own error is shown and its exit status is make's.
run: $(VENV)/.run-stamp
	@$(BIN)/python contrib/examples/run.py

lint: install
	$(BIN)/ruff check taskd taskctl tests contrib
	$(BIN)/ruff format --check taskd taskctl tests contrib
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

test-oldest:
	$(MAKE) --no-print-directory test VENV=.venv-oldest LOWEST=1

# The units in contrib/systemd under a real systemd as PID 1: a minimal Debian (debootstrap,
# cached in /var/cache/taskd-test-systemd) booted with systemd-nspawn, taskd installed in it
# as the README's "systemd" section says. Needs root; says in one line why where it cannot run.
test-systemd: install
	$(BIN)/python -m tests.systemd $(PYTEST_ARGS)

# contrib/protocol.schema.json and contrib/openapi.json are generated from the wire types;
# tests fail when they are stale.
schema: install
	$(BIN)/python -m taskd.schema > contrib/protocol.schema.json
	$(BIN)/python -m taskd.schema openapi > contrib/openapi.json

# The peers of `make bench` (the `bench` extra), beside the test tools.
$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Measurements quoted in the issues' closing notes, each next to a peer measured in the same
# run: tests/bench/compare.py writes its table to tests/bench/RESULTS.md (about 15 minutes;
# quicker: make bench BENCH_ARGS="--repeat 1 --scale 0.2"; some sections only, printed
# and not written: BENCH_ARGS='--only single-flight --only "rate-limited backlog"');
# cron_lateness.py adds the tick lateness under load and the idle CPU (fewer ticks: CRON_ARGS="--ticks 30"); workflows.py
# the parent-end to child-start delay of a chain, and a 1,000-job batch's last job to callback;
# keyed_claims.py what a keyed, rate-limited backlog (100,000 jobs on 1,000 keys) costs an
# enqueue and a no-op claim of other work.
bench: $(VENV)/.bench-stamp
	$(BIN)/python -m tests.bench.compare $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.cron_lateness $(CRON_ARGS)
	$(BIN)/python -m tests.bench.workflows
	$(BIN)/python -m tests.bench.keyed_claims

clean:
	rm -rf .venv .venv-oldest .run .pytest_cache .mypy_cache .ruff_cache
