# lsr-run: every entry point a researcher needs. `make help` lists them.
# CPU machines: TORCH pins the CPU build; on a GPU machine pass e.g. TORCH="torch==2.13.0" with the CUDA index.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
LSR := $(VENV)/bin/lsr-run
STAMP := $(VENV)/.lsr-run-installed
LOCK := requirements.lock
PIP ?= pip==26.3
PIP_TOOLS ?= pip-tools==7.6.2
export LSR_DATA_DIR ?= $(abspath ../shared/data)
export NUMBA_CACHE_DIR ?= $(abspath $(VENV)/numba-cache)
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install lock demo test test-fast bm25 clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-26s %s\n", $$1, $$2}'

# Installs exactly the lock: torch first by its own pin (a CPU build here; TORCH=... for CUDA), then every other
# package at the version and hash in requirements.lock, then lsr-run itself without dependencies.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP)"
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
	$(PY) -m pip check
	$(PY) -m lsr_run.evaluation  # compile ranx's numba functions once, into $(NUMBA_CACHE_DIR)
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install exactly requirements.lock, torch pinned first

lock: ## regenerate requirements.lock from pyproject.toml's ranges (pip-tools, with hashes; torch left to TORCH)
	test -x $(VENV)-lock/bin/pip-compile || { $(PYTHON) -m venv $(VENV)-lock && $(VENV)-lock/bin/pip install -q "$(PIP_TOOLS)"; }
	echo "$(TORCH)" > $(VENV)-lock/torch-constraint.txt
	$(VENV)-lock/bin/pip-compile --quiet --upgrade --extra dev --generate-hashes --strip-extras --unsafe-package torch \
	  --no-emit-index-url --no-emit-find-links \
	  -c $(VENV)-lock/torch-constraint.txt -o $(LOCK) pyproject.toml

demo: $(STAMP) ## train minilm_l6 on scifact, evaluate on scifact/cranfield/cisi beside BM25 (2 cores: 9-12 min on an AMD EPYC Zen 5, 12 min on an Intel CPU with AMX, up to 20 min on other CPUs with native bf16, up to 78 min in fp32; +2-4 min install)
	$(LSR) experiment=demo

bm25: $(STAMP) ## BM25 baseline (k1=0.9, b=0.4, title+text) on the local suite
	$(LSR) experiment=bm25

test: $(STAMP) ## every test: fast unit tests and the integration tests on ../shared/data (~10 min)
	$(PY) -m pytest -q tests

test-fast: $(STAMP) ## in-process unit tests only (tiny random models, no Java, no subprocess, no exhaustive config enumeration): under a minute
	$(PY) -m pytest -q -m "not integration and not process and not exhaustive" tests

clean: ## remove outputs (keeps .venv)
	rm -rf outputs/*/ multirun/

# ---------------------------------------------------------------- paper tables
# Runs go to outputs/tables/<sweep>; the collected tables (Markdown, CSV, LaTeX, chart, source.md with the command
# and commits) to results/<table>, which is kept in the repository. A sweep resumes: finished runs are skipped.
# SWEEP_ARGS="--seeds 1" runs one seed first, SWEEP_ARGS="--runs demo" one recipe.
TABLES := outputs/tables
RESULTS := results
SWEEP_ARGS ?=
# the head's norms after scaling, at initialisation (init_report.json): Frobenius and mean per-row L2 norm
HEAD_NORMS := init_report:head.decoder_frobenius,head.row_norm_mean
.PHONY: table-head-scaling-cpu table-sampling-cpu table-ood-cpu table-ood-prune-cpu table-ood-fusion-cpu table-head-scaling table-sampling

table-head-scaling-cpu: $(STAMP) ## MLM-head rescaling on CPU: plain / x16-inflated / k=8, k=16, match_norm / bias 0; 3 seeds on scifact (21 runs of ~13 min alone on 2 AMD EPYC cores)
	$(PY) scripts/sweep.py conf/sweep/head_scaling_cpu.yaml --out $(TABLES)/head_scaling_cpu $(SWEEP_ARGS)
	$(PY) scripts/collect.py $(TABLES)/head_scaling_cpu --out $(RESULTS)/head_scaling_cpu --seeds --keep-runs --label-from folder \
	  --baseline plain --baseline inflate16 --extra $(HEAD_NORMS)

table-sampling-cpu: $(STAMP) ## top-K vs random vs stratified negatives x (KL, MarginMSE), bi-encoder teacher, 3 seeds at the demo's length (18 runs; in fp32 ~27 min a run alone on 2 AMD EPYC Zen 5 cores)
	$(PY) scripts/sweep.py conf/sweep/sampling_cpu.yaml --out $(TABLES)/sampling_cpu $(SWEEP_ARGS)
	for loss in kl_div margin_mse; do \
	  ls -d $(TABLES)/sampling_cpu/*_$${loss}_s* > /dev/null 2>&1 || { echo "no $$loss runs yet"; continue; }; \
	  $(PY) scripts/collect.py $(TABLES)/sampling_cpu/*_$${loss}_s* --out $(RESULTS)/sampling_cpu_$$loss --seeds --keep-runs \
	    --label-from folder --baseline topk_$$loss --baseline random_$$loss --extra sampling_stats || exit 1; \
	done

table-ood-cpu: $(STAMP) ## out-of-domain recipes (conf/sweep/ood_cpu.yaml) beside BM25 on scifact, cranfield and cisi (bf16: ~12-15 min a run alone on 2 AMD EPYC Zen 5 cores)
	$(LSR) experiment=bm25 hydra.run.dir=$(TABLES)/ood_cpu/bm25
	$(PY) scripts/sweep.py conf/sweep/ood_cpu.yaml --out $(TABLES)/ood_cpu $(SWEEP_ARGS)
	$(PY) scripts/collect.py $(TABLES)/ood_cpu --out $(RESULTS)/ood_cpu --seeds --keep-runs --label-from folder \
	  --baseline bm25 --baseline demo

table-ood-prune-cpu: $(STAMP) ## the demo's vectors statically pruned (conf/sweep/ood_prune_cpu.yaml): 3 demo runs, then each seed's model evaluated with its documents cut to their top 1024/512/256/128 impacts (a minute each), the demo and top-256 fused with BM25
	$(LSR) experiment=bm25 hydra.run.dir=$(TABLES)/ood_prune_cpu/bm25
	$(PY) scripts/sweep.py conf/sweep/ood_prune_cpu.yaml --out $(TABLES)/ood_prune_cpu $(SWEEP_ARGS)
	for run in $(TABLES)/ood_prune_cpu/demo_s* $(TABLES)/ood_prune_cpu/doc_top256_s*; do \
	  name=$$(basename $$run); \
	  $(PY) scripts/fuse.py $(TABLES)/ood_prune_cpu/bm25 $$run --method wsum \
	    --out $(TABLES)/ood_prune_cpu/$${name%_s*}+bm25_wsum_s$${name##*_s} > /dev/null || exit 1; \
	done
	$(PY) scripts/collect.py $(TABLES)/ood_prune_cpu --out $(RESULTS)/ood_prune_cpu --seeds --keep-runs --label-from folder \
	  --baseline bm25 --baseline demo

table-ood-fusion-cpu: $(STAMP) ## each finished out-of-domain recipe run fused with BM25 (min-max wsum 0.5/0.5, and RRF; untuned), beside BM25 and the recipes (minutes; after table-ood-cpu)
	for run in $(TABLES)/ood_cpu/*_s*; do \
	  name=$$(basename $$run); \
	  for method in wsum rrf; do \
	    $(PY) scripts/fuse.py $(TABLES)/ood_cpu/bm25 $$run --method $$method \
	      --out $(TABLES)/ood_fusion_cpu/$${name%_s*}+bm25_$${method}_s$${name##*_s} > /dev/null || exit 1; \
	  done; \
	done
	$(PY) scripts/collect.py $(TABLES)/ood_cpu $(TABLES)/ood_fusion_cpu --out $(RESULTS)/ood_fusion_cpu --seeds --keep-runs \
	  --label-from folder --baseline bm25

table-head-scaling: $(STAMP) ## the rescaling paper's table: backbones x head scaling x 3 seeds (GPU + internet, days)
	$(LSR) stages=[inspect] backbone=bert_base_uncased hydra.run.dir=$(TABLES)/head_scaling/inspect_bert
	REF_NORM=$$($(PY) -c "import json;print(json.load(open('$(TABLES)/head_scaling/inspect_bert/inspect.json'))['options']['configured']['head']['decoder_frobenius'])") \
	  $(PY) scripts/sweep.py conf/sweep/head_scaling_paper.yaml --out $(TABLES)/head_scaling $(SWEEP_ARGS)
	$(PY) scripts/collect.py $(TABLES)/head_scaling --out $(RESULTS)/head_scaling --seeds --keep-runs --label-from folder \
	  --baseline none_bert_base_uncased --extra $(HEAD_NORMS)

table-sampling: $(STAMP) ## the stratified-sampling table: sampler x loss x 3 seeds on MS MARCO (GPU + internet, days)
	$(PY) scripts/sweep.py conf/sweep/sampling_paper.yaml --out $(TABLES)/sampling $(SWEEP_ARGS)
	for loss in kl_div margin_mse; do \
	  $(PY) scripts/collect.py $(TABLES)/sampling/*_$${loss}_s* --out $(RESULTS)/sampling_$$loss --seeds --keep-runs \
	    --label-from folder --baseline topk_$$loss --baseline random_$$loss --extra sampling_stats || exit 1; \
	done

# ---------------------------------------------------------------- collected tables and expected numbers
.PHONY: collect check-bm25 bm25-beir
SWEEP ?=
COLLECT_ARGS ?=

collect: $(STAMP) ## tables (md, csv, tex, png) of a sweep or run dir: make collect SWEEP=<dir> [COLLECT_ARGS="--baseline 0"]
	@test -n "$(SWEEP)" || { echo "usage: make collect SWEEP=<sweep or run directory> [COLLECT_ARGS=...]"; exit 2; }
	$(PY) scripts/collect.py $(SWEEP) --out $(SWEEP)/collected $(COLLECT_ARGS)

check-bm25: $(STAMP) ## BM25 on the local suite, checked against the expected numbers in conf/experiment/bm25.yaml
	$(LSR) experiment=bm25 hydra.run.dir=outputs/check-bm25
	$(PY) scripts/check_expected.py outputs/check-bm25 conf/experiment/bm25.yaml

bm25-beir: $(STAMP) ## BM25 on six small BEIR sets vs Pyserini's nDCG@10 (no GPU; ir_datasets downloads need internet)
	$(LSR) experiment=bm25_beir hydra.run.dir=outputs/bm25-beir
	$(PY) scripts/check_expected.py outputs/bm25-beir

# ---------------------------------------------------------------- benchmark
.PHONY: bench
BENCH_ARGS ?=

bench: $(STAMP) ## lsr-run vs sentence-transformers/Pyserini: encode, train step, search, index, data -> outputs/bench/bench.json (BENCH_ARGS=--quick)
	$(PY) scripts/bench.py $(BENCH_ARGS)

.PHONY: gpu-check-prepare gpu-check-rehearsal
gpu-check-prepare: $(STAMP) ## .gpu/: data, BM25 candidates run file, fp16 weights and wheels for scripts/gpu_check.py run on a bare CUDA machine
	$(PY) scripts/gpu_check.py prepare

gpu-check-rehearsal: gpu-check-prepare ## the GPU check on this CPU (4 steps, adi, quick bench) with Java's and Pyserini's modules unimportable
	$(PY) scripts/gpu_check.py run --quick --block-missing

.PHONY: rerank
rerank: $(STAMP) ## a teacher as a reranker of BM25's top 100 on scifact/cranfield/cisi test (TEACHER=bi_encoder; ~10 min on 2 cores; TEACHER_SET="model=DIR" overrides its keys)
	$(PY) scripts/rerank.py --teacher $(or $(TEACHER),bi_encoder) $(foreach kv,$(TEACHER_SET),--set $(kv)) $(RERANK_ARGS)

.PHONY: teacher-ce
teacher-ce: $(STAMP) ## fine-tune a cross-encoder teacher from minilm_l6 on scifact train (BM25 negatives) -> outputs/teachers/ce_minilm_scifact; then make rerank TEACHER=cross_encoder TEACHER_SET="model=outputs/teachers/ce_minilm_scifact"
	$(PY) scripts/train_cross_encoder.py --out outputs/teachers/ce_minilm_scifact $(CE_ARGS)

.PHONY: bench-gpu
bench-gpu: $(STAMP) ## encode and train step on CUDA at GPU sizes beside sentence-transformers, each as a share of the card's measured bf16 matmul rate
	$(PY) scripts/bench.py --device cuda --sections encode,train --out outputs/bench/bench_gpu.json $(BENCH_ARGS)
