# The two commands a newcomer needs: `make run` and `make test`. Both create .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= sample
DATA ?= ../shared/data/ag_news_sample
CORPUS ?= ../shared/data/reuters21578/reuters21578.csv

.PHONY: run test venv lint bench

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

test: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest

bench: venv
	$(PY) bench/bilm_throughput.py
