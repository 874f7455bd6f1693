# Two commands matter: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test fuzz test-all lint install bench bench-compare bench-ws bench-scaling bench-placement bench-budget chaos clean redis-server test-deps

# Debian packages the suite needs (redis-server, chromium, prometheus's promtool, nginx, haproxy, openssl,
# slowhttptest), installed with apt-get when missing; the list is in .ci/install-deps, which CI
# uses too.
test-deps:
	@.ci/install-deps

# Tests start their own redis-server on a free port.
redis-server:
	@.ci/install-deps redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast]'

demo: install
	$(BIN)/affinity-proxy demo

# Runs ruff and the whole suite on 2 pytest-xdist workers (-n 2; each picks its ports from its own slice,
# devtools/ports.py); -rs prints the reason of any skipped test (CI allows none), --durations the 25
# slowest (where to look when CI gets slow).
test: install test-deps
	$(BIN)/ruff check affinity_proxy tests benchmarks
	$(BIN)/python -m pytest -q -rs -m "not slow" -p no:cacheprovider --durations=25 -n 2

# The property tests with new random examples each run (1000 per test unless a test says otherwise);
# `make test` runs a fixed, derandomized set (tests/conftest.py).
fuzz: install test-deps
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q -p no:cacheprovider $$(grep -rlE "^(from|import) hypothesis" tests)

test-all: install test-deps
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

# Benchmark against nginx and HAProxy (installs nginx, wrk and haproxy with apt-get when missing), 5
# interleaved rounds, about 9 min on a quiet machine; writes benchmarks/RESULTS.md from this one run.
bench: install
	$(BIN)/python -m benchmarks.run --duration 8 --rounds 5 --legs 4

# The same benchmark with REF's proxy beside the current one (REF checked out in a temporary git worktree,
# run with this venv) in the same rounds: prints "current / REF same-round ratio" per target and writes
# benchmarks/COMPARE.md (issue #13: within 5 % of the figure before). REF defaults to the commit before the
# redesign; about 8 min.
REF ?= 9c433204caeeab6bd4a67be0fcb9f174ad14047a
bench-compare: install
	$(BIN)/python -m benchmarks.run --duration 8 --rounds 5 --legs 4 --compare-ref $(REF) --output benchmarks/COMPARE.md --targets nginx-proxy,direct,byte-relay,affinity-proxy,affinity-fly,haproxy-insert,affinity-new

# Where a request's CPU goes (issue #16): µs per request by stage (py-spy samples + kernel time), pinned and
# new-session paths, before (BUDGET_REF, the commit before #16's performance work, run from a git worktree)
# and after, interleaved in 3 rounds of the same run (about 3 min; needs py-spy: installed here with pip);
# writes the CPU-budget section of benchmarks/RESULTS.md.
BUDGET_REF ?= a3d0e59^
bench-budget: install
	$(BIN)/pip install --quiet py-spy
	$(BIN)/python -m benchmarks.cpu_budget --rounds 3 --duration 5 --compare-ref '$(BUDGET_REF)' --write

# WebSocket relay against nginx (issue #16): 20 connections echoing 64-byte messages at 5,000 round trips/s
# through nginx, the Python byte relay and both engines, each proxy alone on CPU 1, 5 interleaved rounds
# (about 4 min): proxy CPU per round trip, medians with min-max; writes the WebSocket section of
# benchmarks/RESULTS.md (add --compare-ref REF to the command for an earlier commit in the same rounds).
bench-ws: install
	@.ci/install-deps nginx
	$(BIN)/python -m benchmarks.ws_bench --rounds 5 --duration 8

# 1M pins in Redis, proxy memory with 100k users, --workers 2 vs 1 (about 3 min): writes benchmarks/SCALING.md.
bench-scaling: install redis-server
	$(BIN)/python -m benchmarks.scaling

# Long chaos run (about 6 min): writes tests/chaos/RESULTS.md.
# Placement at scale (#14): 1M users, 50 weighted instances, ketama vs in-flight-bounded vs ours (about 2 min);
# writes benchmarks/PLACEMENT.md and benchmarks/placement.png (needs the bench extra: matplotlib).
bench-placement: install
	$(BIN)/pip install -q 'matplotlib>=3.7'
	$(BIN)/python -m benchmarks.placement_sim

chaos: install redis-server
	$(BIN)/python -m tests.chaos --long

lint: install
	$(BIN)/ruff check affinity_proxy tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
