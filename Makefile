# The two commands a newcomer needs: `make run` and `make test`. Both create .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= sample
DATA ?= ../shared/data/ag_news_sample
CORPUS ?= ../shared/data/reuters21578/reuters21578.csv

.PHONY: run test venv lint bench docs

# pip compiles every module at install: keep it. Where PYTHONDONTWRITEBYTECODE=1 (as on this
# project's machines and CI), a module left uncompiled compiles again in every process that
# imports it: with --no-compile the suite took 800 s instead of 557 s
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first (it lies on disk); an unpinned torch would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/elmo-news run --profile $(PROFILE) --data $(DATA) --pretrain-corpus $(CORPUS)

# two test processes, a test file each at a time (its module fixtures stay in one process),
# the longest files first (tests/conftest.py orders them), one torch thread each; the slowest
# tests are listed at the end
TEST_PROCS ?= 2
test: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder --durations=15

bench: venv
	$(PY) bench/bilm_throughput.py

docs: venv
	$(VENV)/bin/mkdocs serve
