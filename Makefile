# The two commands a newcomer needs: `make run` and `make test`. Both install
# whatever is missing first (system packages when run as root, the Python
# virtualenv, the buf CLI from npm).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PG_BIN := /usr/lib/postgresql/15/bin
STAMPS := .stamps
DEVDB ?= .devdb
PYTEST_ARGS ?=

.PHONY: help install run test gen check-gen lint format devdb-down bench

help:
	@echo "make run    serve on localhost:50051 (starts a local TLS PostgreSQL unless DATABASE_URL is set)"
	@echo "make test   install what is missing and run the whole suite"
	@echo "make gen    regenerate the Python stubs from protos/"
	@echo "make bench  measure bulk streaming against psql COPY (several minutes)"

install: $(STAMPS)/system $(STAMPS)/python $(STAMPS)/node

$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@if [ ! -x $(PG_BIN)/postgres ] || ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 nodejs npm; \
	  else \
	    echo "missing PostgreSQL 15 server binaries or npm: install the Debian packages postgresql-15 nodejs npm" >&2; exit 1; \
	  fi; \
	fi
	@touch $@

$(STAMPS)/python: requirements.txt requirements-dev.txt pyproject.toml clients/python/pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
	  -e clients/python -e .
	@touch $@

$(STAMPS)/node: package.json package-lock.json
	@mkdir -p $(STAMPS)
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

gen: $(STAMPS)/python
	$(PY) clients/python/generate.py

check-gen: $(STAMPS)/python
	$(PY) clients/python/generate.py --check

lint: install
	$(BUF) lint
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMPS)/python
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: install check-gen lint
	$(PY) -m pytest $(PYTEST_ARGS)

run: install
	@if [ -z "$${DATABASE_URL:-}" ]; then \
	  eval "$$($(PY) -m service.devcluster up $(DEVDB))"; \
	fi; \
	exec $(PY) -m service serve

devdb-down: $(STAMPS)/python
	$(PY) -m service.devcluster down $(DEVDB)

bench: install
	$(PY) -m bench.streaming
