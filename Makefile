# Every target runs inside the project's virtualenv (.venv), which is created
# and filled from the package registries on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
TS     := clients/typescript

.PHONY: setup venv node ts-node gen gen-check lint buf-lint buf-breaking types test ts-test \
	check demo bench bench-quick bench-e2e bench-smoke fuzz fuzz-smoke soak soak-smoke clean

FUZZ_SECONDS ?= 60
FUZZ_DIR     ?= build/fuzz
SOAK_SECONDS ?= 120

setup: venv node ts-node

venv: $(VENV)/.installed
node: node_modules/.installed
ts-node: $(TS)/node_modules/.installed

# Everything the checks, the benchmarks and the code generator use. A venv
# filled this way also has all that the demo needs (.runtime).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(VENV)/.runtime $@

# Only what the demo needs: the package, its runtime dependencies and the
# `fast` extra (uvloop).
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TS)/node_modules/.installed: $(TS)/package.json $(TS)/package-lock.json
	npm ci --prefix $(TS) --no-audit --no-fund --loglevel=error
	touch $@

# Python classes and registry, TypeScript SDK code, shared wire vectors.
gen: venv ts-node
	$(PY) -m codegen gen --ts-out $(TS)/src/gen
	$(PY) tests/vectors/generate.py

gen-check: venv ts-node
	$(PY) -m codegen check --ts-out $(TS)/src/gen
	$(PY) tests/vectors/generate.py --check

buf-lint: node
	npx --no-install buf lint

# A wire-incompatible schema change against the previous commit of main fails.
buf-breaking: node
	@if git rev-parse --verify --quiet 'main~1^{commit}' >/dev/null; then \
	  npx --no-install buf breaking --against '.git#branch=main,ref=HEAD~1,subdir=proto'; \
	else echo "buf breaking: skipped, main has no previous commit"; fi

lint: venv buf-lint buf-breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# As this system sees the code, as macOS does and as Windows does (each its own
# cache: switching platforms would otherwise invalidate the one cache on every
# run). For Windows: the named-pipe transport and every branch on
# sys.platform == "win32"; the Unix socket transport and the Unix-only tests
# are not for Windows, the pipes' tests are.
types: venv
	$(BIN)/mypy
	$(BIN)/mypy --platform darwin --cache-dir .mypy_cache/darwin
	$(BIN)/mypy --platform win32 --cache-dir .mypy_cache/win32 \
	    --exclude 'daemoneye_eventbus/transports/unix\.py$$' \
	    daemoneye_eventbus tests/test_pipes.py tests/test_windows_pipes.py

# pytest exits 5 when it collects nothing: like every non-zero exit, that fails.
test: venv ts-node
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest tests benchmarks/test_hot_paths.py benchmarks/test_suite_smoke.py

ts-test: ts-node
	npm test --prefix $(TS)

check: gen-check lint types ts-test test bench-smoke bench-quick fuzz-smoke soak-smoke

demo: $(VENV)/.runtime
	$(BIN)/daemoneye-eventbus demo

# This bus side by side with ZeroMQ, NATS and Mosquitto (installed by the suite
# if missing): benchmarks/RESULTS.md and benchmarks/results.png, about 7 minutes.
bench: venv
	$(PY) -m benchmarks.suite

# The same on small counts, for CI (about 50 s); written under build/ so that
# the committed results stay.
bench-quick: venv
	$(PY) -m benchmarks.suite --quick --out build/bench/RESULTS.md --chart build/bench/results.png

# The end-to-end harness of this bus alone.
bench-e2e: venv
	$(PY) -m benchmarks.e2e

bench-smoke: venv
	$(PY) -m benchmarks.e2e --messages 5000 --latency-messages 500 --duration-cap 60

# Coverage-guided fuzzing of the frame decoder and of the broker's per-connection
# handling; crashes land in $(FUZZ_DIR)/artifacts (see fuzz/README.md).
fuzz: venv
	mkdir -p $(FUZZ_DIR)/frames $(FUZZ_DIR)/session $(FUZZ_DIR)/artifacts
	$(PY) -m fuzz.fuzz_frames -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/frames- $(FUZZ_DIR)/frames fuzz/corpus/frames
	$(PY) -m fuzz.fuzz_session -max_total_time=$(FUZZ_SECONDS) -timeout=10 -max_len=8192 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/artifacts/session- \
	    $(FUZZ_DIR)/session fuzz/corpus/session

fuzz-smoke: venv
	$(MAKE) fuzz FUZZ_SECONDS=15

# Publishers, subscribers and hostile clients together; fails if a well-behaved
# subscriber loses an event, the broker dies or its memory exceeds the bound.
soak: venv
	$(PY) -m benchmarks.soak --duration $(SOAK_SECONDS)

soak-smoke: venv
	$(PY) -m benchmarks.soak --duration 10

clean:
	rm -rf $(VENV) node_modules $(TS)/node_modules $(TS)/dist .mypy_cache .pytest_cache .ruff_cache
