# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LEDGER := $(BIN)/ledger

.PHONY: install broker demo example test test-deps test-unit test-integration bench soak check down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Fetches the Kafka jars from Maven Central on first use; a no-op when
# KAFKA_BOOTSTRAP_SERVERS points at an existing cluster.
broker: install
	$(LEDGER) broker start

demo: install
	$(LEDGER) up
	$(LEDGER) demo

# The SDK's chat backend example against the local stack, with a fake model server (no provider needed).
example: install
	$(LEDGER) up
	$(BIN)/python -m examples.chat_backend $(EXAMPLE_ARGS)

# pytest exits 5 when no test ran; make treats any non-zero exit as failure.
test: test-deps broker
	$(BIN)/pytest -q tests

# docker-compose and PostgreSQL's server binaries: apt-get installs them when missing and we are root; otherwise
# one line says how to get them (and only the tests that need them fail).
test-deps:
	@sh tools/test-deps.sh

test-unit: install
	$(BIN)/pytest -q tests/unit

# Benchmarks print figures next to a baseline measured in the same run; they assert nothing.
# Every figure beside its baseline from the same run (docs/benchmarks.md). BENCH_USERS: users of the RSS figure
# (1,000,000 takes the longest part of the run; 100000 for a quick look); BENCH_FLAGS go to the pipeline benchmark
# (e.g. --events 50000 --no-two-workers --profile-seconds 10), BENCH_CHECK_FLAGS to the checks (e.g. --seconds 5).
BENCH_USERS ?= 1000000
BENCH_FLAGS ?=
BENCH_CHECK_FLAGS ?=
bench: broker
	$(BIN)/python -m tests.benchmarks.pipeline $(BENCH_FLAGS)
	$(BIN)/python -m tests.benchmarks.fold
	$(BIN)/python -m tests.benchmarks.checks --rates 200,1000 $(BENCH_CHECK_FLAGS)
	$(BIN)/python -m tests.benchmarks.state --users $(BENCH_USERS)
	$(BIN)/python -m tests.benchmarks.history
	$(BIN)/python -m tests.benchmarks.webhooks

# The crash-exact repro and the fault matrix looped SOAK_RUNS times (default 10; about 12 min a run).
SOAK_RUNS ?= 10
soak: broker
	$(BIN)/python -m tests.reliability.soak --runs $(SOAK_RUNS)

check: install
	$(BIN)/ruff check ledger ledger_sdk streams projections tests examples
	$(BIN)/mypy

down:
	$(LEDGER) down

clean: down
	rm -rf .ledger
