# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make run    install into .venv and run the pipeline on the bundled digits data set
#   make test   install into .venv and run the tests (what CI runs); make test-fast: those not marked slow
# Extra arguments for the run: make run ARGS="selector=lcs_gmm budget=0.2"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# The exact versions installed (pip constraints); pyproject.toml declares the ranges they must lie in.
LOCK := requirements.lock

.PHONY: install run test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev,cpu]'
	touch $@

run: install
	$(BIN)/python -m ssat.run $(ARGS)

# One OpenMP thread per test process (and the runs they start): with one pytest worker per core, two threads each
# oversubscribe the cores and the small tensors of the tests then wait on each other (7 min instead of 13 here).
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST)

# The inner loop: everything but the real subprocess runs (CLI output, exit codes, kill -9, SLURM, concurrency).
test-fast: install
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) .ssat_cache outputs multirun
