# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench format clean

# uv installs the requirements in about half pip's time (parallel downloads, bytecode compiled
# on every core); pip remains the fallback where uv cannot reach the index (pip.conf settings).
PIP := $(PY) -m pip install -q
UV := $(PY) -m uv pip install -q --python $(PY) --compile-bytecode

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) uv==0.13.9
	$(UV) -r requirements.txt || $(PIP) -r requirements.txt
	$(UV) --no-deps -e . || $(PIP) --no-deps -e .
	touch $(STAMP)

DEMO := runs/demo
SPINEDET := $(VENV)/bin/spinedet

# The quickstart: synthetic shapes -> train a narrowed SpineNet-49S Mask R-CNN on the CPU -> COCO
# AP on the held-out split -> predictions drawn over test images -> loss/AP curves, in runs/demo.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(SPINEDET) data shapes --out $(DEMO)/data --num-images 400 --size 192 --splits 0.8 0.1 0.1
	$(SPINEDET) train quickstart --out $(DEMO)
	$(SPINEDET) eval $(DEMO) --annotations $(DEMO)/data/test.json --images $(DEMO)/data/images \
		--out $(DEMO)
	$(SPINEDET) predict $(DEMO) $$($(PY) -c "import json; print(' '.join('$(DEMO)/data/images/' \
		+ i['file_name'] for i in json.load(open('$(DEMO)/data/test.json'))['images'][:8]))") \
		--out $(DEMO)/predictions
	@echo "results: $(DEMO)/metrics.json, $(DEMO)/curves.png, $(DEMO)/predictions/*.png"

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks scripts
	$(PY) -m ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs
