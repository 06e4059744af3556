# Two commands for a fresh machine:  make quickstart   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of PyTorch goes in first, so the package's `torch>=2.4` is already satisfied and
# pip never pulls a multi-GB CUDA build. On a GPU machine: make TORCH="torch" quickstart
TORCH  ?= torch==2.13.0

.PHONY: setup quickstart test bench check-llamacpp clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

quickstart: setup
	$(BIN)/scratchlm quickstart

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks

# llama.cpp itself runs our GGUF exports (same ids, logits, greedy tokens). Installing
# llama-cpp-python compiles llama.cpp (~3 minutes on 2 cores), so this is not part of `make test`.
check-llamacpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(BIN)/python -m pip install -q "llama-cpp-python>=0.3"
	$(BIN)/python -m pytest -q tests/check_llamacpp.py

clean:
	rm -rf $(VENV) runs
