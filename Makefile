# callpolicy: `make run` starts the service on the embedded store; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint bench bench-redis bench-kamailio bench-radius clean venv

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
	$(BIN)/ruff check policy tests bench
	$(BIN)/mypy policy

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_redis.py
	$(BIN)/python bench/bench_radius.py

bench-redis: $(STAMP)
	$(BIN)/python bench/bench_redis.py

bench-kamailio: $(STAMP)
	$(BIN)/python bench/bench_kamailio.py

bench-radius: $(STAMP)
	$(BIN)/python bench/bench_radius.py

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache .hypothesis
