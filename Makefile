# memspace: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
DATA ?= ./data
LISTEN ?= 127.0.0.1:50051
MODEL ?= wordllama-l2-256
PYTEST_ARGS ?=

.PHONY: help venv run test lint fmt bench soak clean proto openapi e2e-kind chart-crds bench-operator image lock

include hack/k8s.mk

help:
	@echo "make run    install and start a standalone memspace server on $(LISTEN) (data in $(DATA);"
	@echo "           its 'default' space embeds text with $(MODEL); MODEL=none: clients send vectors)"
	@echo "make test   install everything, run lint and the whole test suite"
	@echo "make lint   ruff, mypy --strict, import-linter, hadolint, shellcheck, lock file check"
	@echo "make image  build the memspace:dev image (a docker-save tar) with a local dockerd"
	@echo "make lock   regenerate requirements.lock (the image's pinned, hashed dependencies)"
	@echo "make bench  benchmarks, figures written to benchmarks/results.json"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

run: venv
	$(BIN)/memspace serve --data-root $(DATA) --listen $(LISTEN) --default-embedding-model $(MODEL)

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy $(wildcard server contract operator cli tests benchmarks)
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck -x hack/*.sh hack/k8s/*.sh
	hack/sync-chart-crd.sh --check
	$(BIN)/python hack/lockfile.py
	$(BIN)/python -m memspace_server.api.openapi --check docs/openapi.json

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# One pytest run per test package: each gets its own control plane and nothing left behind by
# another package's tests (a failure in one still fails the target, after all have run).
TEST_PACKAGES := $(filter-out tests/support/,$(sort $(dir $(wildcard tests/*/__init__.py))))
test: lint k8s-tools image
	@status=0; for package in $(TEST_PACKAGES); do \
	  echo "== pytest $$package"; \
	  $(BIN)/pytest $$package $(PYTEST_ARGS) || status=1; \
	done; exit $$status

# The long variants: the same tests with more trials (MEMSPACE_SOAK=1 raises their counts).
soak: venv
	MEMSPACE_SOAK=1 $(BIN)/pytest tests/storage/test_space_model.py tests/reliability $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m benchmarks.run

# The operator alone: 10,000 MemorySpaces applied at once on the local control plane (long: the
# 1,000 of `make bench` take about 4 minutes on 2 cores, this ten times as many spaces);
# MEMSPACE_BENCH_SPACES=N for another size.
bench-operator: k8s-tools
	MEMSPACE_BENCH_SPACES=$${MEMSPACE_BENCH_SPACES:-10000} $(BIN)/python -m benchmarks.run --only operator_bench

e2e-kind: venv
	hack/e2e-kind.sh $(PYTEST_ARGS)

# The image memspace:dev, built with Debian's dockerd (started and stopped by the script) from a
# locally made Debian base, saved as a docker-save tar under ~/.cache/memspace/images/ (its path
# is printed). Rebuilt only when the Dockerfile, the lock file or the sources change.
image:
	@bash hack/image.sh build

# The image's dependencies: pyproject.toml's runtime dependencies and build backend, resolved for
# Python 3.11 on Linux, every file pinned by hash (needs the package index; `make lint` checks
# offline that the lock is current).
lock: venv
	$(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform linux --generate-hashes \
	  --custom-compile-command "make lock" --output-file requirements.lock \
	  pyproject.toml hack/image/build-requirements.in

chart-crds:
	hack/sync-chart-crd.sh

proto: venv
	$(BIN)/python contract/proto/generate.py

# The HTTP/JSON API's OpenAPI document, built from the routes and the protobuf descriptors
# (`make lint` checks that the committed copy is current).
openapi: venv
	$(BIN)/python -m memspace_server.api.openapi --write docs/openapi.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
