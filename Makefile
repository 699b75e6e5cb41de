# callpolicy: `make run` starts the service on the embedded store; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

FUZZ_SECONDS ?= 30

.PHONY: fuzz run test lint bench bench-quick bench-redis bench-cluster bench-kamailio bench-radius clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/callpolicy --config service.toml serve

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check policy tests bench fuzz
	$(BIN)/mypy policy

# BENCH_ARGS: e.g. BENCH_ARGS=--quick (smoke test), --runs 5, --pin; see bench/bench.py --help
bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python bench/bench.py --quick $(BENCH_ARGS)

bench-redis: $(STAMP)
	$(BIN)/python bench/bench_redis.py $(BENCH_ARGS)

bench-cluster: $(STAMP)
	$(BIN)/python bench/bench_cluster.py $(BENCH_ARGS)

bench-kamailio: $(STAMP)
	$(BIN)/python bench/bench_kamailio.py

bench-radius: $(STAMP)
	$(BIN)/python bench/bench_radius.py $(BENCH_ARGS)

fuzz: $(STAMP)
	$(BIN)/pip install -q atheris
	$(BIN)/python fuzz/run.py $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache .hypothesis
