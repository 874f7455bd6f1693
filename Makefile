# Two commands matter: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast]'

demo: install
	$(BIN)/affinity-proxy demo

# Runs ruff and the whole suite (needs redis-server on PATH: tests start their own on a free port).
test: install
	$(BIN)/ruff check affinity_proxy tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-all: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check affinity_proxy tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
