# One command to run the service, one to run the tests; both create the environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; override for a GPU machine, e.g. make TORCH_SPEC='torch==2.13.0' with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,bench

.PHONY: install run test unit chaos lint bench fixtures clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/arabic-words run

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The fast layer: everything but the tests that start real Celery workers or cause faults (`make test` runs all).
unit: install
	$(PY) -m pytest -m "not integration and not chaos"

# Every chaos scenario at full size (SIGKILL x 20, whole-worker kills x 5, ...); `make test` runs each once.
chaos: install
	CHAOS_FULL=1 $(PY) -m pytest -q -m chaos tests/test_chaos.py tests/test_sentinel.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m bench

fixtures: install
	$(PY) -m tests.data.make_fixtures

clean:
	rm -rf $(VENV) .run .pytest_cache
