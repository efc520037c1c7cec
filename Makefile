# Every target sets itself up: a .venv in the repo that sees the machine's own packages,
# so a machine that already has torch (a CUDA build, say) keeps it. Where there is none,
# torch==2.13.0 goes in first: the CPU wheel, with no CUDA packages.
# `make train` installs what training needs; test, lint and bench add the dev extras.
# pip runs quiet (-q): a venv that sees the machine's packages makes it say "Can't uninstall"
# for each one it shadows, which is pip's noise, not a problem.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: install install-dev train test test-fast lint format bench clean

install: $(STAMP)

install-dev: $(DEV)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(PIP) -e '.[dev]'
	touch $(DEV)

train: $(STAMP)
	$(PY) scripts/train.py +composite=parallel

test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(DEV)
	$(PY) -m pytest -q -m "not slow"

lint: $(DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(DEV)  # options through ARGS: make bench ARGS="--quick --only guard"
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
