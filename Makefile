# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment first, from requirements.lock: developers and CI
# install exactly the versions locked there (CPU PyTorch included), so a fresh clone is
# green on any day. Users installing the package get the ranges in pyproject.toml instead;
# `make compat` checks both ends of those ranges, `make lock` re-resolves the lock.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PACKAGES := bridge_core adapters/bridge_adapters plugins/llava/bridge_llava \
	plugins/qwen2vl/bridge_qwen2vl
# Where `make lock` finds the CPU build of PyTorch: the wheel on this machine's disk, else
# PyTorch's CPU index (both serve torch==X+cpu, which has no CUDA dependencies).
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

.PHONY: setup demo test lint docs bench lock compat clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml plugins/llava/pyproject.toml plugins/qwen2vl/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . -e plugins/llava \
		-e plugins/qwen2vl
	$(BIN)/python -m pip check
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

# Re-resolve requirements.lock from requirements.in (keeps existing pins; UPGRADE=1 moves
# every pin to the newest release the ranges allow).
lock: setup
	$(BIN)/uv pip compile requirements.in --output-file requirements.lock --python-version 3.11 \
		--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) $(TORCH_SOURCE) \
		--no-emit-package transformer-bridge --no-emit-package transformer-bridge-llava \
		--no-emit-package transformer-bridge-qwen2vl

# The test suite against the oldest and newest torch/transformers that pyproject declares.
compat: setup
	$(BIN)/python .ci/compat.py --markdown compat-results.md

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache
