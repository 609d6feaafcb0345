# Two commands do all the set-up on a fresh machine:
#   make run    runs the default federated job (embedded local Ray)
#   make test   runs lint and the test suite
# Both create .venv on first use. torch 2.13.0 (CPU build) is installed first so
# the range in pyproject.toml never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m fedray.launch $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check fedray tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fedray tests benchmarks
	$(PY) -m ruff format --check fedray tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun
