# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned for the set-up only (a CPU build on these machines); the package accepts torch>=2.4.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,cli,lightning,transformers,experiments

.PHONY: venv demo test lint typecheck pytest bench experiments clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/sewa demo --out sewa-report --force

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

test: lint pytest

bench: venv
	$(BIN)/python benchmarks/selection.py
	$(BIN)/python benchmarks/make_performance_doc.py
	$(BIN)/python benchmarks/recording.py
	$(BIN)/python benchmarks/threads.py

clean:
	rm -rf $(VENV) build dist *.egg-info
