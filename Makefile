# Every target runs inside the project's virtualenv (.venv), which `make setup`
# creates from the package registries.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: setup gen gen-check lint buf-lint types test check demo bench clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

gen: setup
	$(PY) -m codegen gen

gen-check: setup
	$(PY) -m codegen check

buf-lint: setup
	npx --no-install buf lint

lint: setup buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: setup
	$(BIN)/mypy

test: setup
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest

check: gen-check lint types test

demo: setup
	$(PY) -m daemoneye_eventbus.demo

bench: setup
	$(PY) -m benchmarks.e2e

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .ruff_cache
