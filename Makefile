# The README's commands. Each sets up the virtual environment on first use (torch==2.13.0 CPU build pinned).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,offline-encoder]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/multitask train configs/demo.yaml --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/step_time.py
