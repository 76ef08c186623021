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
PGBOUNCER := /usr/sbin/pgbouncer
STAMPS := .stamps
DEVDB ?= .devdb
PYTEST_ARGS ?=

.PHONY: help install run test gen check-gen lint format devdb-down bench contract-baseline soak

help:
	@echo "make run    serve on localhost:50051 (starts a local TLS PostgreSQL unless DATABASE_URL is set)"
	@echo "make test   install what is missing and run the whole suite"
	@echo "make gen    regenerate the Python, TypeScript and Go stubs from protos/"
	@echo "make soak   the fault suite's soak for five minutes (SOAK_SECONDS=300)"
	@echo "make bench  measure bulk streaming against psql COPY, unary calls against their limits, the change feed's fan-out, reads as the tables grow and consumer groups against a single follower (several minutes)"

# $(call apt_install,MISSING,PACKAGES,WHAT): when the shell test MISSING
# holds, apt-installs the Debian PACKAGES as root, else fails naming them.
define apt_install
@if $(1); then \
  if [ "$$(id -u)" = 0 ]; then \
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(2); \
  else \
    echo "missing $(3): install the Debian packages $(2)" >&2; exit 1; \
  fi; \
fi
endef

install: $(STAMPS)/system $(STAMPS)/python $(STAMPS)/node $(STAMPS)/go $(STAMPS)/kubectl

$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	$(call apt_install,[ ! -x $(PG_BIN)/postgres ] || ! command -v npm >/dev/null || ! command -v jq >/dev/null,postgresql-15 nodejs npm jq,PostgreSQL 15 server binaries or npm or jq)
	@# Separately, so a node.js from elsewhere (which conflicts with Debian's npm)
	@# does not stop it being installed.
	$(call apt_install,[ ! -x $(PGBOUNCER) ],pgbouncer,pgbouncer (the tests run the core suite through it))
	$(call apt_install,! command -v gcc >/dev/null,gcc libc6-dev,a C compiler (the wire.c encoders))
	$(call apt_install,[ ! -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ],python3-dev,Python's C headers (the wire.c encoders))
	@touch $@

# The editable install also compiles the wire.c encoders in place, hence
# their prerequisites (gcc comes from $(STAMPS)/system).
$(STAMPS)/python: requirements.txt requirements-dev.txt pyproject.toml setup.py service/events/wire.c service/orders/wire.c service/rpc/protobuf_wire.h clients/python/pyproject.toml
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

# Go and its protobuf/gRPC libraries and code generators, all from Debian:
# the Go client (clients/go) builds offline in GOPATH mode against
# /usr/share/gocode, since no Go module proxy is reachable from CI.
# golang-github-golang-protobuf-1-5-dev replaces the 1.3 one that grpc-go
# pulls in by default: grpc-go 1.33's codec marshals through
# github.com/golang/protobuf, whose 1.3 panics on the messages protoc-gen-go
# 1.28 generates (1.4 and later hand them to google.golang.org/protobuf).
GO_MISSING := ! command -v go >/dev/null || ! command -v protoc-gen-go >/dev/null \
  || ! command -v protoc-gen-go-grpc >/dev/null \
  || [ ! -d /usr/share/gocode/src/google.golang.org/grpc ] \
  || [ ! -d /usr/share/gocode/src/google.golang.org/protobuf ] \
  || [ ! -f /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go ]
$(STAMPS)/go:
	@mkdir -p $(STAMPS)
	$(call apt_install,$(GO_MISSING),golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc,Go with grpc-go and its code generators (clients/go))
	@touch $@

# Python, TypeScript and Go stubs.
gen: $(STAMPS)/python $(STAMPS)/node $(STAMPS)/go
	$(PY) clients/python/generate.py
	$(BUF) generate --template buf.gen.yaml

# The TypeScript and Go stubs are regenerated into a scratch folder and compared.
check-gen: $(STAMPS)/python $(STAMPS)/node $(STAMPS)/go
	$(PY) clients/python/generate.py --check
	@scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	  $(BUF) generate --template buf.gen.yaml -o "$$scratch" && \
	  for gen in clients/node/gen clients/go/gen; do \
	    diff -r "$$scratch/$$gen" "$$gen" \
	    || { echo "generated code in $$gen is stale; run \`make gen\`" >&2; exit 1; }; \
	  done

# The contract callers rely on: a buf image of the last released protos/,
# refreshed deliberately (at a release) so that `buf breaking` in `make lint`
# compares every change, main's own CI run included, against it.
contract-baseline: $(STAMPS)/node
	$(BUF) build --exclude-source-info -o protos/baseline.binpb

# kubectl renders the kustomize overlays (`kubectl kustomize`); any kubectl
# will do, else Debian's kubernetes-client.
$(STAMPS)/kubectl:
	@mkdir -p $(STAMPS)
	$(call apt_install,! command -v kubectl >/dev/null,kubernetes-client,kubectl)
	@touch $@

.PHONY: deploy-check
# The image and the manifests: hadolint, then every overlay rendered and
# validated against the Kubernetes schemas shipped in kubernetes-validate.
deploy-check: $(STAMPS)/python $(STAMPS)/kubectl
	$(VENV)/bin/hadolint Dockerfile
	@for overlay in deploy/overlays/*/; do \
	  rendered=$(STAMPS)/rendered-$$(basename $$overlay).yaml; \
	  kubectl kustomize $$overlay > $$rendered; \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k 1.37.0 $$rendered; \
	  echo "$$overlay: valid"; \
	done

lint: install deploy-check
	$(BUF) lint
	$(BUF) breaking --against protos/baseline.binpb
	@# And against main's protos, so a change cannot refresh the baseline to
	@# slip a break through (skipped where no main branch exists).
	@if git rev-parse -q --verify refs/heads/main >/dev/null; then \
	  $(BUF) breaking --against '.git#branch=main'; \
	fi
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m mypy --strict clients/python/src/orderstream/client
	@# The Go client and the benchmark's followers: gofmt, then go vet
	@# (GOPATH mode, as clients/go/README.md explains).
	@unformatted=$$(gofmt -l clients/go bench) && [ -z "$$unformatted" ] \
	  || { echo "not gofmt'd: $$unformatted" >&2; exit 1; }
	GO111MODULE=off GOPATH=$(CURDIR)/clients/go:$(CURDIR)/clients/go/gen:/usr/share/gocode \
	  go vet orderstream/client

format: $(STAMPS)/python
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: install check-gen lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The fault suite's soak, long: mixed load with random faults, then the
# ledger check (`make test` runs a 20 s version).
SOAK_SECONDS ?= 300
soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest tests/faults/test_soak.py -s --timeout=0 $(PYTEST_ARGS)

# No tokens on a developer's machine: ORDERSTREAM_INSECURE_DEV lets the
# service serve without caller authentication (it says so loudly at startup);
# ORDERSTREAM_INSECURE_DEV=0 in the environment turns it off.
run: install
	@if [ -z "$${DATABASE_URL:-}" ]; then \
	  exports="$$($(PY) -m devcluster up $(DEVDB))" || exit 1; \
	  eval "$$exports"; \
	fi; \
	ORDERSTREAM_INSECURE_DEV="$${ORDERSTREAM_INSECURE_DEV:-1}" exec $(PY) -m service serve

devdb-down: $(STAMPS)/python
	$(PY) -m devcluster down $(DEVDB)

# h2load (Debian's nghttp2-client) drives the unary benchmark; the fan-out
# benchmark's followers are a Go program built with Debian's Go and grpc-go
# ($(STAMPS)/go).
$(STAMPS)/bench: $(STAMPS)/go
	@mkdir -p $(STAMPS)
	$(call apt_install,! command -v h2load >/dev/null,nghttp2-client,h2load)
	@touch $@

bench: install $(STAMPS)/bench
	$(PY) -m bench.streaming
	$(PY) -m bench.unary
	$(PY) -m bench.round_trip
	$(PY) -m bench.fanout
	$(PY) -m bench.scale
	$(PY) -m bench.groups
