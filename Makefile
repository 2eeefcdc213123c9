# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment first. TORCH pins the CPU build of PyTorch for
# development and CI (a bare `pip install torch` can pull a multi-GB CUDA build);
# users installing the package get the `torch>=2.4` range from pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PACKAGES := bridge_core adapters/bridge_adapters plugins/llava/bridge_llava

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/llava/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,cli,docs]" -e plugins/llava
	touch $(STAMP)

demo: setup
	$(BIN)/transformer-bridge demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(PACKAGES)

docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache
