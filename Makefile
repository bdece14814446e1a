# Two commands set everything up on a machine that has only Python 3.11 (and make):
#   make run    a virtual environment, torch, scaler; then the main job: scaler solve --flops 10G
#   make test   the same set-up, then the whole test suite (what CI runs: .ci/run)
# torch is installed first and alone, so nothing pulls a CUDA build by accident. TORCH_INDEX picks
# the wheel index: empty uses pip's configured one; PyTorch's CPU builds are at
# https://download.pytorch.org/whl/cpu (make run TORCH_INDEX=https://download.pytorch.org/whl/cpu).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: run test quick bench setup clean

run: setup
	$(BIN)/scaler solve --flops 10G

test: setup
	$(BIN)/python -m pytest -q

quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m pytest benchmarks -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV)
