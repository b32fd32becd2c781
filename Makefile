# Two commands on a fresh clone:  `make run` (set up + sample inference)  and  `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# gpu-check's Python: the project's venv where there is one, else the machine's (a GPU machine's own PyTorch).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: setup setup-dev run finetune-recipe finetune-recipe-bases lint test test-all reports gpu-check

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
	$(PY) -m llama.assets

setup-dev: setup $(VENV)/.dev

run: setup
	$(PY) inference.py

# The fine-tuning recipe that visibly teaches the default model the Alpaca format (README, "A recipe that learns").
RECIPE = --optimizer adamw --lr 3e-4 --lr_schedule cosine --warmup_steps 5 --epochs 3 --lora_targets wq,wk,wv,wo,w1,w2,w3
finetune-recipe: setup
	$(PY) finetuning.py $(RECIPE) --out reports/finetune_recipe --run_dir runs/finetune_recipe

# The recipe again with its frozen base held in bf16, int8 and int4 (QLoRA-style); Phase 3 compares the losses.
finetune-recipe-bases: setup
	for base in bf16 int8 int4; do \
		$(PY) finetuning.py $(RECIPE) --base $$base --out reports/finetune_recipe_$$base \
			--run_dir runs/finetune_recipe_$$base || exit 1; \
	done

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow" tests

test-all: lint
	$(PY) -m pytest -q tests

reports: setup
	$(PY) -m project.reports

# On a CUDA machine: the `cuda` tests, then a short Table 1 and Table 3 into reports/gpu/ (about 10 minutes).
# Installs what is missing where pip can; says what it skipped. Elsewhere it refuses in one line.
gpu-check:
	$(GPU_PYTHON) -m project.bench.gpu_check
