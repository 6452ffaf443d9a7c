# `make train` / `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where MNIST's raw IDX files live (DATA/MNIST/raw/...). CI points it at ../shared/data.
DATA ?= data
ARGS ?=

$(BIN)/fprnn-ready: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install train test bench docs
install: $(BIN)/fprnn-ready

train: install
	$(BIN)/python train.py experiment=paper_mnist rule=w3 lr=0.25 data.root=$(DATA) $(ARGS)

test: install
	FPRNN_DATA=$(DATA) $(BIN)/python -m pytest -q $(ARGS)

bench: install
	FPRNN_DATA=$(DATA) $(BIN)/python -m fprnn.bench $(ARGS)

docs: install
	$(BIN)/mkdocs build --strict
