# DriveEngine: every target installs what it needs first, so each works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
FULL   := $(VENV)/.installed-full
DEMO   ?= demo_data

.PHONY: install install-full test lint demo bench pretrain clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch first: a looser pin would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,viz]"
	touch $(STAMP)

# Adds Open3D (312 MB; needs Debian's libusb-1.0-0) for `show --3d` and the PCD cross-check test.
install-full: $(FULL)

$(FULL): $(STAMP)
	$(PIP) install --quiet -e ".[dev,viz,o3d]"
	touch $(FULL)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(PY) -m driveengine.demo --out $(DEMO)

bench: install
	$(PY) -m benchmarks

# Without --data in PRETRAIN_ARGS: make the demo data first (only what is missing) and train on it.
pretrain: install
ifeq ($(filter --data --data=%,$(PRETRAIN_ARGS)),)
	$(PY) -m driveengine.demo --out $(DEMO) --data-only
	$(PY) -m driveengine.cli pretrain --data $(DEMO)/dataset --split mini $(PRETRAIN_ARGS)
else
	$(PY) -m driveengine.cli pretrain $(PRETRAIN_ARGS)
endif

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
