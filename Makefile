# Two commands on a fresh clone:   make run   (offline quickstart pipeline)   and   make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned here, installed first, so no other package can pull a different (multi-GB) torch build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup run test clean

$(BIN)/kiln: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/kiln

setup: $(BIN)/kiln

run: setup
	$(BIN)/kiln run --profile quickstart

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
