# The README's two commands: `make run` and `make test`. Everything they need is installed here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODES ?= 32

.PHONY: run test lint setup setup-dev proto bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the local CPU wheel: any other torch requirement pulls GBs of CUDA packages.
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

run: setup
	$(BIN)/python -m sim.run --nodes $(NODES)

# ruff (style, imports, likely bugs) and mypy (types of proto, model, node, coordinator, sim), both
# configured in pyproject.toml; `make test` runs them first, so CI does
lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

# one OpenMP thread per process: tests, Ray actors and servers share 2 cores, and oversubscribed
# torch threads make small models tens of times slower
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Regenerate the committed gRPC code from proto/federation.proto.
proto: setup-dev
	$(BIN)/python -m proto.generate

bench: setup
	$(BIN)/python -m sim.bench

clean:
	rm -rf $(VENV) .cache runs
