# miroflow: two commands do everything on a fresh machine.
#   make demo   install into .venv (if needed) and run the pipeline on the embedded shapes domain
#   make test   install into .venv (if needed) and run the test suite (what CI runs)
#   make serve  the control room: Prefect server + UI, cpu/gpu work pools with a worker each (Ctrl-C stops)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.miroflow-installed
# pip prints a harmless warning per missing local index location on this machine; hide those.
PIPFILTER := { grep -v -E "Location '.*' is ignored" || true; }

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo serve lint format test test-all bench clean-work

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip 2>&1 | $(PIPFILTER)
	$(PY) -m pip install -q -e '.[test,dask]' -c constraints.txt 2>&1 | $(PIPFILTER)
	$(PY) -c "import torch, torchvision, diffusers, open_clip, webdataset, mlflow, prefect, miroflow"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	PREFECT_HOME=$(CURDIR)/work/prefect $(VENV)/bin/miroflow demo

# Prefect UI + deployments + one process worker per pool (docs/control-room.md); SERVE_ARGS="--port 4300"
serve: install
	$(VENV)/bin/miroflow serve $(SERVE_ARGS)

# ruff (lint + format check), the layer contract and mypy against its shrinking baseline
lint: install
	$(VENV)/bin/ruff check src flows tests benchmarks .ci
	$(VENV)/bin/ruff format --check -q src flows tests benchmarks .ci
	$(VENV)/bin/lint-imports --no-cache
	$(PY) .ci/mypy_baseline.py

format: install
	$(VENV)/bin/ruff format -q src flows tests benchmarks .ci
	$(VENV)/bin/ruff check --fix -q src flows tests benchmarks .ci

test: install lint
	PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/pytest -q

test-all: install lint
	PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/pytest -q -m "slow or not slow"

bench: install
	$(PY) benchmarks/bench.py --size tiny

clean-work:
	rm -rf work manifests/*.json
