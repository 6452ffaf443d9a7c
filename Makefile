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

.PHONY: install train test test-fast bench docs docs-figures
install: $(BIN)/fprnn-ready

train: install
	$(BIN)/python train.py experiment=paper_mnist rule=w3 lr=0.25 data.root=$(DATA) $(ARGS)

# one worker a core (pytest-xdist; a file's tests, and a docs page's examples, stay together and in order)
XDIST ?= -n auto --dist loadfile

test: install
	FPRNN_DATA=$(DATA) $(BIN)/python -m pytest -q $(XDIST) $(ARGS)

# the unit tests alone, for the edit–run loop (the docs' examples and the tests that train are left out)
test-fast: install
	FPRNN_DATA=$(DATA) $(BIN)/python -m pytest -q $(XDIST) -m "not integration" tests $(ARGS)

bench: install
	FPRNN_DATA=$(DATA) $(BIN)/python -m fprnn.bench $(ARGS)

docs: install
	$(BIN)/mkdocs build --strict

# The docs' figures, drawn from real runs and committed under docs/assets/ (small PNGs):
# make docs-figures CDM=<experiment=cdm run> TRIALS=<experiment=trials run> PAPER=<make train run> MAZES=<experiment=mazes run>
docs-figures: install
	for run in $(CDM) $(TRIALS) $(PAPER); do $(BIN)/python -m fprnn.figures $$run || exit 1; done
	cp $(CDM)/figures/psychometric.png docs/assets/cdm_psychometric.png
	cp $(CDM)/figures/fixed_points.png docs/assets/cdm_fixed_points.png
	cp $(TRIALS)/figures/example_trials.png docs/assets/trials_example.png
	cp $(PAPER)/figures/loss.png docs/assets/paper_loss.png
	cp $(PAPER)/figures/angles.png docs/assets/paper_angles.png
	$(BIN)/python -c "from pathlib import Path; from fprnn.models.maze_net import MazeNet; \
	from fprnn.data.mazes import draw, collate; from fprnn.analysis.mazes import figure; \
	figure(MazeNet.load('$(MAZES)'), {c: collate([(k, draw(0, 'test', c, k)) for k in range(2)]) for c in (4, 9)}, \
	       Path('docs/assets/mazes.png'))"
