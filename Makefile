# Two commands do all the set-up:
#   make pipeline   installs the pipeline into .venv, runs the four steps with their default settings, then compare.py
#   make test       installs the pipeline and pytest into .venv and runs the offline test suite
PYTHON ?= python3
SOURCE ?= auto  # data2csv.py's source: auto (modelscope, else coco) | modelscope | coco | hf:<dataset id> | a local imagefolder
TRAIN_ARGS ?=         # extra train.py settings, e.g. TRAIN_ARGS="--num_train_epochs=1"
# two test processes of one thread each (a machine of 2 cores), a test file's tests in one of them, in the order that
# tests/conftest.py gives (the longest first); the slowest shown
PYTEST_ARGS ?= -n 2 --dist loadscope --no-loadscope-reorder --durations=15
VENV := .venv
BIN := $(VENV)/bin

.PHONY: pipeline test
pipeline: $(VENV)/.pipeline-installed
	$(BIN)/python data2csv.py --source=$(strip $(SOURCE))
	$(BIN)/python csv2json.py
	$(BIN)/python train.py $(TRAIN_ARGS)
	$(BIN)/python infer.py
	$(BIN)/python compare.py

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(VENV)/.pipeline-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements-dev.txt
	touch $@ $(VENV)/.pipeline-installed
