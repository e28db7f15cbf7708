# Two commands on a fresh machine: `make demo` and `make test`. Both make .venv themselves
# and install the exact versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[dev]"
	touch $@

demo: $(VENV)/.base
	rm -rf out/demo out/demo-labels
	$(BIN)/annotate run configs/demo.yaml
	$(BIN)/annotate report out/demo
	$(BIN)/annotate run configs/demo-labels.yaml
	$(BIN)/annotate report out/demo-labels

test: $(VENV)/.dev
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

bench: $(VENV)/.dev
	$(BIN)/python tests/benchmarks/run_overhead.py
	$(BIN)/python tests/benchmarks/resume_1m.py

clean:
	rm -rf $(VENV) out
