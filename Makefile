# Two commands on a fresh clone:   make run   (offline quickstart pipeline)   and   make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned here, installed first, so no other package can pull a different (multi-GB) torch build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup run test clean wheelhouse

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

# For a GPU host with no network that has its own torch and torchvision (README, "Training on GPUs"): every other
# requirement as wheels for that host's Python, here, into wheelhouse/ (with wheelhouse/requirements.txt).
HOST_PYTHON ?= 3.12
WHEELHOUSE ?= wheelhouse
wheelhouse:
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb")); print("\n".join([d for d in project["project"]["dependencies"] if not d.startswith("torch")] + project["build-system"]["requires"]))' >$(WHEELHOUSE)/requirements.txt
	$(PYTHON) -m pip download --quiet --dest $(WHEELHOUSE) --only-binary=:all: --python-version $(HOST_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -r $(WHEELHOUSE)/requirements.txt
