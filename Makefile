# The loyalty platform. `make run` starts the whole suite; `make test` runs every test.
# Every target installs what it needs into .venv/ and node_modules/ first.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP) ## Create .venv and install the suite with its development tools

# package.json pins buf exactly, and buf pins its per-platform binaries; no lock file is
# kept because npm here records only this platform's optional packages in one.
$(BUF): package.json
	npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

proto: $(STAMP) ## Regenerate the Python stubs from proto/ into libs/loyalty/
	$(BIN)/python tools/protogen.py

lint: $(STAMP) $(BUF) ## buf lint and format, stub drift check, ruff, mypy
	cd proto && ../$(BUF) lint && ../$(BUF) format --diff --exit-code
	$(BIN)/python tools/protogen.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

services: ## Make sure the local PostgreSQL and Redis are running (starts or installs them)
	bash tools/ensure-services.sh

test: $(STAMP) $(BUF) services ## Run every test: unit, integration (SQLite, PostgreSQL, Redis), end to end
	$(BIN)/python tools/protogen.py --check
	$(BIN)/pytest $(PYTEST_ARGS)

helm-lint: $(STAMP) ## Lint and render the Helm chart with Helm's engine; Kubernetes schemas; policies
	$(BIN)/pytest tests/helm/test_chart.py tests/helm/test_image.py -q

run: $(STAMP) ## Start all six services in one process on SQLite, with demo data
	$(BIN)/loyalty run

demo-receipt: $(STAMP) ## Calculate and commit a demo receipt against a running suite
	$(BIN)/loyalty demo-receipt --card 7700000000016

cluster: $(STAMP) services ## Start each service as its own process on PostgreSQL and Redis
	$(BIN)/loyalty cluster

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP) services ## Benchmark in cluster mode beside a gRPC echo ceiling (BENCH_ARGS=...; docs/performance.md)
	$(BIN)/python -m tools.bench run $(BENCH_ARGS)

clean: ## Remove local data (var/) and caches; keeps .venv and node_modules
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install proto lint services test helm-lint run demo-receipt cluster clean bench
