# FER2013 study: ViT vs ResNet50V2 vs AlexNet-style CNN. `make help` lists the targets.
PROFILE ?= quick
# The first supported interpreter on PATH (3.11 first: the study's numbers were measured on it),
# or PYTHON=/path/to/python3.x. TensorFlow 2.21 has wheels for 3.11-3.13 only.
SUPPORTED_PYTHONS := python3.11 python3.12 python3.13 python3
PYTHON ?= $(firstword $(foreach candidate,$(SUPPORTED_PYTHONS),$(shell command -v $(candidate) >/dev/null 2>&1 && $(candidate) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null && echo $(candidate))))
VENV ?= .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2
export MPLBACKEND ?= Agg

.DEFAULT_GOAL := help
.PHONY: help setup report train search ablation status tensorboard test test-fast lab benchmark gpu-pack gpu-merge clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PROFILE=$(PROFILE) (smoke | quick | paper), FER2013_PATH=path to the data"

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: no supported Python found (3.11, 3.12 or 3.13 as python3.x on PATH); install one or run make PYTHON=/path/to/python3.x"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed ## create .venv and install ferlib with its dev extras

report: setup ## run the whole study for PROFILE and render reports/<PROFILE>/ (resumable)
	$(BIN)/python -m ferlib report --profile $(PROFILE)

train: setup ## train PROFILE's models, one process each, logging to runs/PROFILE/train.log (resumable)
	@mkdir -p runs/$(PROFILE)
	@for model in $$($(BIN)/python -c "from ferlib.config import load_params; print(*load_params('$(PROFILE)')['models'])"); do \
		echo "training $$model (log: runs/$(PROFILE)/train.log)"; \
		$(BIN)/python -m ferlib train --profile $(PROFILE) --model $$model >> runs/$(PROFILE)/train.log 2>&1 || exit 1; \
	done

search: setup ## Optuna recipe search of every model in PROFILE's search space, one after another (resumable; log: runs/PROFILE/search.log)
	@mkdir -p runs/$(PROFILE)
	@for model in $$($(BIN)/python -c "from ferlib.config import load_params; from ferlib import MODEL_NAMES; space = load_params('$(PROFILE)')['search']['space']; print(*[m for m in MODEL_NAMES if m in space])"); do \
		echo "searching $$model (log: runs/$(PROFILE)/search.log)"; \
		$(BIN)/python -m ferlib search --profile $(PROFILE) --model $$model >> runs/$(PROFILE)/search.log 2>&1 || exit 1; \
	done

ablation: setup ## A/B runs of training techniques (PROFILE's ablation: section), one model after another (resumable; log: runs/PROFILE/ablation.log)
	@mkdir -p runs/$(PROFILE)
	@for model in $$($(BIN)/python -c "from ferlib.config import load_params; print(*load_params('$(PROFILE)')['ablation']['models'])"); do \
		echo "A/B of $$model (log: runs/$(PROFILE)/ablation.log)"; \
		$(BIN)/python -m ferlib ablation --profile $(PROFILE) --model $$model >> runs/$(PROFILE)/ablation.log 2>&1 || exit 1; \
	done

status: ## epochs done, best PublicTest accuracy and time left per model of PROFILE's run
	@$(BIN)/python -m ferlib status --profile $(PROFILE)

tensorboard: setup ## live training curves of PROFILE's models (TensorBoard on http://localhost:6006)
	$(BIN)/tensorboard --logdir runs/$(PROFILE)/models

test: setup ## run the test suite (includes the slow smoke-pipeline test)
	$(BIN)/python -m pytest

test-fast: setup ## the quick inner loop: no training, no pipeline, no JAX subprocess (the full suite is make test)
	$(BIN)/python -m pytest -m "not slow and not train and not jax"

lab: setup ## open JupyterLab on notebooks/
	$(BIN)/jupyter lab notebooks/

benchmark: setup ## measure data loading, training and inference speed -> benchmarks/results.json
	$(BIN)/python benchmarks/run_all.py

gpu-pack: setup ## pack what a lent GPU needs into .gpu/: the wheels and the data as xz parts (docs/gpu.md)
	PYTHON=$(BIN)/python benchmarks/gpu_study.sh pack $(or $(FER2013_PATH),data/fer2013.zip)

gpu-merge: setup ## merge a device session's returned files (FROM=folder) into runs/PROFILE (then make report)
	@test -n "$(FROM)" || { echo "error: FROM=folder of the files the device call returned"; exit 2; }
	$(BIN)/python -m ferlib gpu-merge --profile $(PROFILE) --from $(FROM)

clean: ## remove caches and the smoke run (keeps .venv, runs/quick and committed reports)
	rm -rf .cache .pytest_cache runs/smoke reports/smoke
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
