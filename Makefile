# The single entry point. `make demo` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-lowest serve worker bench bench-serve bench-monitor bench-loop bench-ingest bench-soak lint format typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the whole loop on the embedded default (SQLite, local artifacts under ./var/demo)
	$(BIN)/driftloop demo $(DEMO_ARGS)

test: $(STAMP)  ## SQLite + a real PostgreSQL cluster + promtool, when their binaries are installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

LOWEST := .venv-lowest

$(LOWEST)/.installed: pyproject.toml ci/constraints-lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet --only-binary=:all: -c ci/constraints-lowest.txt -e ".[dev]"
	touch $@

test-lowest: $(LOWEST)/.installed  ## the suite with every direct dependency at its lower bound in pyproject.toml
	$(LOWEST)/bin/python -m pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/driftloop bootstrap
	$(BIN)/driftloop serve --host 127.0.0.1 --port 8000

worker: $(STAMP)
	$(BIN)/driftloop worker --host 127.0.0.1 --port 9100

bench: bench-serve bench-monitor bench-loop bench-ingest

bench-serve: $(STAMP)
	$(BIN)/python bench/serve.py

bench-monitor: $(STAMP)
	$(BIN)/python bench/monitor.py

bench-loop: $(STAMP)
	$(BIN)/python bench/loop.py

bench-ingest: $(STAMP)
	$(BIN)/python bench/ingest.py

bench-soak: $(STAMP)  ## 35 minutes of traffic with the loop acting; not part of `make bench`
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
