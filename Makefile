# lsr-run: every entry point a researcher needs. `make help` lists them.
# CPU machines: TORCH pins the CPU build; on a GPU machine pass e.g. TORCH="torch==2.13.0" with the CUDA index.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
LSR := $(VENV)/bin/lsr-run
STAMP := $(VENV)/.lsr-run-installed
export LSR_DATA_DIR ?= $(abspath ../shared/data)
export NUMBA_CACHE_DIR ?= $(abspath $(VENV)/numba-cache)
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install demo test test-fast bm25 clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-26s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install lsr-run with torch pinned first

demo: $(STAMP) ## train minilm_l6 on scifact, evaluate on scifact/cranfield/cisi beside BM25 (CPU, ~20 min)
	$(LSR) experiment=demo

bm25: $(STAMP) ## BM25 baseline (k1=0.9, b=0.4, title+text) on the local suite
	$(LSR) experiment=bm25

test: $(STAMP) ## every test: fast unit tests and the integration tests on ../shared/data (~15 min)
	$(PY) -m pytest -q tests

test-fast: $(STAMP) ## unit tests only (tiny random models, no Java)
	$(PY) -m pytest -q -m "not integration" tests

clean: ## remove outputs (keeps .venv)
	rm -rf outputs/*/ multirun/
