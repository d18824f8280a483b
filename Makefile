# DriveEngine: every target installs what it needs first, so each works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   ?= demo_data

.PHONY: install test lint demo bench pretrain clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch first: a looser pin would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,viz,o3d]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(PY) -m driveengine.demo --out $(DEMO)

bench: install
	$(PY) -m benchmarks

pretrain: install
	$(PY) -m driveengine.cli pretrain $(PRETRAIN_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
