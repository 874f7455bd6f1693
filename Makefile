# Two commands matter: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-all lint install bench bench-scaling chaos clean redis-server

# Tests start their own redis-server on a free port; install Debian's package when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast]'

demo: install
	$(BIN)/affinity-proxy demo

# Runs ruff and the whole suite (needs redis-server on PATH: tests start their own on a free port).
test: install redis-server
	$(BIN)/ruff check affinity_proxy tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-all: install redis-server
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Benchmark against nginx (installs nginx and wrk with apt-get when missing); writes benchmarks/RESULTS.md.
bench: install
	$(BIN)/python -m benchmarks.run --duration 10 --rounds 3

# 1M pins in Redis, proxy memory with 100k users, --workers 2 vs 1 (about 3 min): writes benchmarks/SCALING.md.
bench-scaling: install redis-server
	$(BIN)/python -m benchmarks.scaling

# Long chaos run (about 6 min): writes tests/chaos/RESULTS.md.
chaos: install redis-server
	$(BIN)/python -m tests.chaos --long

lint: install
	$(BIN)/ruff check affinity_proxy tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
