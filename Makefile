# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spinedet models --filter 49s
	$(VENV)/bin/spinedet info spinenet49s_maskrcnn --size 640

test: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m pytest -q

format: $(STAMP)
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests

clean:
	rm -rf $(VENV) runs
