# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment first, from requirements.lock: developers and CI
# install exactly the versions locked there (CPU PyTorch included), so a fresh clone is
# green on any day. Users installing the package get the ranges in pyproject.toml instead;
# `make compat` checks both ends of those ranges, `make lock` re-resolves the lock.
# `make bench-compare` measures TransformerLens and nnsight from a venv of their own
# (.venv-compare, from requirements-compare.lock), each in its own process.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
COMPARE_VENV ?= .venv-compare
COMPARE_STAMP := $(COMPARE_VENV)/.installed-stamp
PACKAGES := bridge_core adapters/bridge_adapters plugins/llava/bridge_llava \
	plugins/siglip/bridge_siglip plugins/qwen2vl/bridge_qwen2vl
# Where `make lock` finds the CPU build of PyTorch: the wheel on this machine's disk, else
# PyTorch's CPU index (both serve torch==X+cpu, which has no CUDA dependencies).
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

.PHONY: setup demo test lint docs bench bench-compare lock compat clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml plugins/llava/pyproject.toml \
		plugins/siglip/pyproject.toml plugins/qwen2vl/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . -e plugins/llava \
		-e plugins/siglip -e plugins/qwen2vl
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/transformer-bridge demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(PACKAGES) benchmarks

docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python -m benchmarks

# TransformerLens and nnsight side by side with the bridge: each tool in its own process
# (ours in $(VENV), theirs in $(COMPARE_VENV)) against that process's own HF baseline.
bench-compare: setup $(COMPARE_STAMP)
	$(BIN)/python -m benchmarks.compare --compare-python $(COMPARE_VENV)/bin/python \
		--threads 1 --clock cpu $(BENCH_ARGS)

$(COMPARE_STAMP): requirements-compare.lock | setup
	$(PYTHON) -m venv $(COMPARE_VENV)
	$(BIN)/uv pip install --quiet --no-deps --python $(COMPARE_VENV)/bin/python \
		-r requirements-compare.lock $(TORCH_SOURCE)
	$(COMPARE_VENV)/bin/python -m pip check
	touch $(COMPARE_STAMP)

# Re-resolve requirements.lock from requirements.in (keeps existing pins; UPGRADE=1 moves
# every pin to the newest release the ranges allow), then requirements-compare.lock, which
# holds every package it shares with requirements.lock at that lock's version (but
# transformer-lens: the dev lock has sae-lens's 3.x, the comparison measures the newest).
lock: setup
	$(BIN)/uv pip compile requirements.in --output-file requirements.lock --python-version 3.11 \
		--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) $(TORCH_SOURCE) \
		--no-emit-package transformer-bridge --no-emit-package transformer-bridge-llava \
		--no-emit-package transformer-bridge-siglip --no-emit-package transformer-bridge-qwen2vl
	grep -v '^transformer-lens==' requirements.lock > $(VENV)/compare-constraints.txt
	$(BIN)/uv pip compile requirements-compare.in --output-file requirements-compare.lock \
		--python-version 3.11 --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) \
		$(TORCH_SOURCE) --constraints $(VENV)/compare-constraints.txt

# The test suite against the oldest and newest torch/transformers that pyproject declares.
compat: setup
	$(BIN)/python .ci/compat.py --markdown compat-results.md

clean:
	rm -rf $(VENV) $(COMPARE_VENV) site .mypy_cache .ruff_cache .pytest_cache
