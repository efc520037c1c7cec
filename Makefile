# Every target sets itself up: a .venv in the repo that sees the machine's own packages,
# so a machine that already has torch (a CUDA build, say) keeps it. Where there is none,
# torch==2.13.0 goes in first: the CPU wheel, with no CUDA packages.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py +composite=parallel

test: lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  # options through ARGS: make bench ARGS="--quick --only guard"
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
