# Every target runs inside the project's virtualenv (.venv), which is created
# and filled from the package registries on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: setup venv node gen gen-check lint buf-lint types test check demo bench bench-smoke clean

setup: venv node

venv: $(VENV)/.installed
node: node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

gen: venv
	$(PY) -m codegen gen

gen-check: venv
	$(PY) -m codegen check

buf-lint: node
	npx --no-install buf lint

lint: venv buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: venv
	$(BIN)/mypy

# pytest exits 5 when it collects nothing: like every non-zero exit, that fails.
test: venv
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest tests benchmarks/test_hot_paths.py

check: gen-check lint types test bench-smoke

demo: venv
	$(BIN)/daemoneye-eventbus demo

bench: venv
	$(PY) -m benchmarks.e2e

bench-smoke: venv
	$(PY) -m benchmarks.e2e --messages 5000 --latency-messages 500 --duration-cap 60

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .ruff_cache
