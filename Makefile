# Two commands for a fresh machine:  make quickstart   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of PyTorch goes in first, so the package's `torch>=2.4` is already satisfied and
# pip never pulls a multi-GB CUDA build. On a GPU machine: make TORCH="torch" quickstart
TORCH  ?= torch==2.13.0

.PHONY: setup browser quickstart test bench check-llamacpp clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench,serve]"
	touch $@

quickstart: setup
	$(BIN)/scratchlm quickstart

test: setup browser
	$(BIN)/python -m pytest -q

# The web chat page is tested in a real headless Chromium from the Debian packages (Playwright drives the
# system browser; it never downloads one). Installed here when missing, and only where that can work:
# as root with apt-get. Anywhere else it says what to install, and that test fails until it is there.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium is missing: install it (sudo apt-get install chromium) for tests/test_serve_browser.py"; fi; }

bench: setup
	$(BIN)/python -m benchmarks

# llama.cpp itself runs our GGUF exports (same ids, logits, greedy tokens). Installing
# llama-cpp-python compiles llama.cpp (~3 minutes on 2 cores), so this is not part of `make test`.
check-llamacpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(BIN)/python -m pip install -q "llama-cpp-python>=0.3"
	$(BIN)/python -m pytest -q tests/check_llamacpp.py

clean:
	rm -rf $(VENV) runs
