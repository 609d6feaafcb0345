# Two commands do all the set-up on a fresh machine:
#   make run    runs the default federated job (embedded local Ray)
#   make test   runs lint and the test suite
# Both create .venv on first use. torch 2.13.0 is installed first, so the range in
# pyproject.toml never pulls another build: without a GPU (no working `nvidia-smi`) the
# CPU build from PyTorch's CPU-only index, not PyPI's multi-GB CUDA build; if that index
# is unreachable (10 s, no retries), plain torch==2.13.0 from the configured index.
# Pass job overrides in quotes: make run ARGS="crypto=none rounds=5"
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# make test runs the test files one after another (TEST_WORKERS=0): on 2 cores, two files
# at once (pytest-xdist, TEST_WORKERS=2) took 1430 s against about 1090 s in a row, as each
# file's Ray jobs already keep both cores busy. More cores: TEST_WORKERS=N runs N at once.
TEST_WORKERS ?= 0

.PHONY: run test lint bench mutants clean docs docs-serve

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "== GPU found: installing torch==$(TORCH) (default CUDA build, large)"; \
	  $(PY) -m pip install --progress-bar on torch==$(TORCH); \
	else \
	  echo "== no GPU: installing torch==$(TORCH), CPU build, from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install --progress-bar on --timeout 10 --retries 0 \
	    --index-url $(TORCH_CPU_INDEX) torch==$(TORCH) || { \
	    echo "== $(TORCH_CPU_INDEX) failed or unreachable: torch==$(TORCH) from the default index"; \
	    $(PY) -m pip install --progress-bar on torch==$(TORCH); }; \
	fi
	@echo "== installing fedray and its dependencies (pip install -e '.[dev]')"
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m fedray.launch $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check fedray tests benchmarks
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# The benchmarks behind README's figures (long: about an hour on 2 cores), each figure into
# one results file per run, benchmarks/results/runs/<time>-<commit>.json, with the machine,
# the load and the commit. Compare two: .venv/bin/python benchmarks/compare.py OLD NEW.
# Pass options in quotes: make bench BENCH_ARGS="--only crypto --only noise"
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fedray tests benchmarks
	$(PY) -m ruff format --check fedray tests benchmarks

# Mutation testing, not part of `make test` (long: see docs/testing.md). (a) mutmut on
# the pure modules ([tool.mutmut] in pyproject.toml), (b) one-line runtime mutants
# applied, tested with real Ray jobs and reverted by tests/mutants/run_hand_mutants.py.
# It edits the working tree while it runs: commit first, and run nothing else meanwhile.
mutants: $(STAMP)
	$(VENV)/bin/mutmut run; $(VENV)/bin/mutmut results; $(PY) tests/mutants/run_hand_mutants.py

# The documentation site (mkdocs.yml, docs/). `make docs` builds it into site/ in strict
# mode: a broken link or anchor, or a configuration key without a docstring, fails it
# (tests/test_docs.py runs the same build). `make docs-serve` serves it on
# http://127.0.0.1:8000 and rebuilds on every change. NO_MKDOCS_2_WARNING: Material's
# banner about its successor, printed on every build otherwise.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) outputs multirun mutants
