# One entry point for people and CI. Every target does its own set-up.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard proto/plait/v1/*.proto)
GEN_DIR := clients/python
GOOGLE_PROTOS = $(shell $(BIN)/python -c 'import os, google.rpc; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
GRPC_PROTOS = $(shell $(BIN)/python -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
FLOW ?= examples/scatter_gather.yaml

.PHONY: help venv lock proto proto-check proto-lint proto-baseline dashboard lint typecheck test test-slow test-all check run bench bench-peers bench-throughput bench-capacity clean ts ts-setup proto-ts

help:
	@echo "make run        run $(FLOW) on the embedded coordinator + local workers"
	@echo "make test       unit, integration and system tests, but the slow tier (~10 min on 2 cores)"
	@echo "make test-slow  the slow tier: tests of 10 s or more, the container install (~5 min)"
	@echo "make test-all   both, as CI runs them"
	@echo "make check      lint + typecheck + proto drift + test (what CI runs)"
	@echo "make proto      regenerate Python stubs from proto/"
	@echo "make proto-ts   regenerate the TypeScript stubs (clients/typescript/src/gen) from proto/"
	@echo "make ts         npm ci (from the lock) and build clients/typescript (the TypeScript SDK)"
	@echo "make dashboard  regenerate deploy/grafana/plait.json from deploy/grafana/dashboard.py"
	@echo "make bench      the issue 13 shapes at equal slots, 3 rounds, Plait only (prints a table)"
	@echo "make bench-peers  the same shapes on Plait, Dask and Ray, alternating (creates .venv-peers)"
	@echo "make bench-throughput  many-slot throughput and latency (tests/bench/throughput.py)"
	@echo "make bench-capacity  one coordinator's capacity, measured (docs/capacity.md; ~5 min)"
	@echo "make lock       re-resolve the hashed dependency locks in requirements/"

venv: $(STAMP)

# Installs come only from the hashed lock (pip --require-hashes): every wheel is the one the lock
# names, byte for byte. Plait itself is then installed editable without resolving anything.
$(STAMP): pyproject.toml requirements/dev.lock
	@echo "==> setting up $(VENV): Plait and its dev tools from requirements/dev.lock (first run or the lock changed; about a minute)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements/dev.lock
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolves the locks from pyproject.toml (newest releases within its ranges) with uv, for
# every platform (--universal), with the hashes of every published file.
UV_VERSION := 0.9.30
LOCK = $(BIN)/uv pip compile pyproject.toml requirements/build.in --universal --python-version 3.11 --generate-hashes -q
lock: $(STAMP)
	@echo "==> refreshing requirements/*.lock with uv $(UV_VERSION)"
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(LOCK) --upgrade -o requirements/runtime.lock
	$(LOCK) --upgrade --extra otlp -o requirements/otlp.lock
	$(LOCK) --upgrade --extra dev -o requirements/dev.lock
	@echo "==> locks written; review 'git diff requirements/' and run make test"

proto: $(STAMP)
	rm -f $(GEN_DIR)/plait/v1/*_pb2*.py $(GEN_DIR)/plait/v1/*_pb2*.pyi
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto -I$(GOOGLE_PROTOS) -I$(GRPC_PROTOS) \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--mypy_out=quiet:$(GEN_DIR) --mypy_grpc_out=quiet:$(GEN_DIR) $(PROTO_FILES)

# Fails when the committed stubs differ from what proto/ generates.
proto-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit/test_proto_drift.py

# buf lint over a descriptor image built by protoc (no network needed for google/rpc imports).
proto-lint: $(STAMP)
	@if [ -x $(BIN)/buf ]; then \
	  $(BIN)/python -m grpc_tools.protoc -Iproto -I$(GOOGLE_PROTOS) -I$(GRPC_PROTOS) \
	    --include_imports --include_source_info --descriptor_set_out=$(VENV)/plait.binpb $(PROTO_FILES) && \
	  $(BIN)/buf lint $(VENV)/plait.binpb --config proto/buf.yaml --path plait/v1 && echo "buf lint: clean" && \
	  $(BIN)/buf breaking $(VENV)/plait.binpb --against proto/baseline.binpb --config proto/buf.yaml \
	    --path plait/v1 && echo "buf breaking (against proto/baseline.binpb): none"; \
	else echo "buf not installed on this platform; skipping buf lint and buf breaking"; fi

# The committed image `buf breaking` compares against: the protocol as workers in other
# languages know it. Rewrite it only with a deliberate, announced change to the wire contract.
proto-baseline: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$(GOOGLE_PROTOS) -I$(GRPC_PROTOS) \
	  --include_imports --descriptor_set_out=proto/baseline.binpb $(PROTO_FILES)

# The Grafana dashboard is code (grafana-foundation-sdk); the JSON it writes is committed and
# tests/unit/test_dashboard.py fails when the two drift.
dashboard: $(STAMP)
	$(BIN)/python deploy/grafana/dashboard.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# setuptools maps three folders onto one `plait` namespace; mypy needs to see that shape, so
# it checks a tree of symlinks laid out as the installed package.
TC := $(VENV)/typecheck
typecheck: $(STAMP)
	rm -rf $(TC) && mkdir -p $(TC)/plait
	for f in clients/python/plait/*; do ln -s $(CURDIR)/$$f $(TC)/plait/; done
	ln -s $(CURDIR)/coordinator $(TC)/plait/coordinator
	ln -s $(CURDIR)/workerd $(TC)/plait/workerd
	cd $(TC) && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p plait

# The slow tier (@pytest.mark.slow: ten seconds or more each, or a fresh install) is left out of
# `make test` to keep it near ten minutes on two cores; CI (.ci/run) runs it too.
test: $(STAMP) ts-setup
	@echo "==> pytest: every test but the slow tier (make test-slow); about 10 minutes on 2 cores"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

test-slow: $(STAMP) ts-setup
	@echo "==> pytest: the slow tier (failover, partitions, restarts under load, the container install)"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow tests

test-all: test test-slow

check: lint typecheck proto-lint test-all

# The TypeScript worker SDK (clients/typescript). node_modules come only from the committed
# package-lock.json (npm ci), once per change of the lock; dist/ is rebuilt when a source changed.
# The conformance suite runs dist/examples/worker.js, so `make test` builds it first when npm is
# installed (.ci/run installs it); without npm the TypeScript tests skip (fail under CI).
TS_DIR := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.installed
TS_BUILT := $(TS_DIR)/dist/.built
TS_SOURCES = $(shell find $(TS_DIR)/src $(TS_DIR)/test $(TS_DIR)/examples -name '*.ts') $(TS_DIR)/tsconfig.json

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	@echo "==> npm ci in $(TS_DIR) (first run or the lock changed)"
	cd $(TS_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

$(TS_BUILT): $(TS_STAMP) $(TS_SOURCES)
	@echo "==> building $(TS_DIR) (tsc)"
	cd $(TS_DIR) && npm run --silent build
	touch $@

ts: $(TS_BUILT)

ts-setup:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory ts; \
	else echo "npm not installed: the TypeScript SDK tests will skip (apt-get install -y nodejs npm)"; fi

proto-ts: $(STAMP) $(TS_STAMP)
	cd $(TS_DIR) && PLAIT_PYTHON=$(CURDIR)/$(BIN)/python npm run --silent generate

run: $(STAMP)
	$(BIN)/plait run $(FLOW)

# Benchmarks (docs/benchmarks.md). BENCH_ARGS passes flags through: make bench BENCH_ARGS="--rounds 1".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m tests.bench.compare --rounds 3 $(BENCH_ARGS)

# The peers (Dask, Ray) live in a venv of their own, from requirements/peers.txt (exact pins, no
# hashes: not part of CI), so they never touch .venv or the locks.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): requirements/peers.txt
	@echo "==> setting up $(PEERS_VENV): Dask and Ray from requirements/peers.txt (first run or it changed)"
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q -r requirements/peers.txt
	touch $@

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m tests.bench.compare --rounds 3 --peers dask,ray \
		--peers-python $(PEERS_VENV)/bin/python $(BENCH_ARGS)

bench-throughput: $(STAMP)
	$(BIN)/python -m tests.bench.throughput

# docs/capacity.md's table: BENCH_ARGS="--quick" (~2 min), "--sections idle,busy", "--json F".
bench-capacity: $(STAMP)
	$(BIN)/python -m tests.bench.capacity $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-peers build *.egg-info .mypy_cache .ruff_cache .pytest_cache .plait
