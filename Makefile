# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make run    install into .venv and run the pipeline on the bundled digits data set
#   make test   install into .venv and run the tests
# Extra arguments for the run: make run ARGS="selector=lcs_gmm budget=0.2"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/python -m ssat.run $(ARGS)

test: install
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) .ssat_cache outputs multirun
