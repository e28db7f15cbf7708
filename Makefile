# Two commands on a fresh machine: `make demo` and `make test`. Both make .venv themselves
# and install the exact versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench screenshot clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[dev,ray,heif,s3]"
	touch $@

# The bench extra adds the baselines' clients (openai, litellm), pinned exactly.
$(VENV)/.bench: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[dev,ray,heif,s3,bench]"
	touch $@

demo: $(VENV)/.base
	rm -rf out/demo out/demo-labels out/demo-batch
	$(BIN)/annotate run configs/demo.yaml
	$(BIN)/annotate report out/demo
	$(BIN)/annotate run configs/demo-labels.yaml
	$(BIN)/annotate report out/demo-labels
	$(BIN)/annotate run configs/demo-batch.yaml
	$(BIN)/annotate report out/demo-batch

test: $(VENV)/.dev
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

# The README's picture of annotate view, of the demo's output (needs Debian's chromium).
screenshot: $(VENV)/.dev
	rm -rf out/demo
	$(BIN)/annotate run configs/demo.yaml -q
	$(BIN)/python scripts/readme_screenshot.py out/demo docs/viewer.png

# check_pth runs on the base interpreter with no site (-S -I): a venv interpreter would run the
# start-up files it checks for. It stops the benchmarks when the venv has one not allowed.
bench: $(VENV)/.bench
	$(PYTHON) -S -I tests/benchmarks/check_pth.py $(VENV)
	$(BIN)/python tests/benchmarks/suite.py

clean:
	rm -rf $(VENV) out
