# The README's commands. `make demo` and `make test` create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seglab-installed
PROFILE ?= demo
PORT ?= 8888
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow lab bench report check-params lint sync-notebooks readme-numbers help

help:
	@echo "make demo      run every notebook of the demo profile, then print reports/index.html"
	@echo "make test      run the test suite (pytest; the smoke profile of every notebook, not the demo chain)"
	@echo "make test-slow run the slow tests: the whole demo chain and README's numbers (about 15 min)"
	@echo "make lab       JupyterLab on 127.0.0.1:$(PORT) (token printed)"
	@echo "make bench     run the benchmarks in bench/ (ratios against references)"
	@echo "make report    rebuild reports/index.html from the run manifests"
	@echo "make lint      ruff on lib, tests, bench and the notebooks' paired scripts"
	@echo "make sync-notebooks   bring each notebooks/NN_name.ipynb and its .py pair up to date (newer wins)"
	@echo "make readme-numbers   rewrite README's headline-numbers table from the latest $(PROFILE) runs"

# pip takes torch 2.14.1 and torchvision 0.29.1 from this machine's disk (see README, troubleshooting).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m seglab run-all --profile $(PROFILE)
	@echo "Status page: $(CURDIR)/reports/index.html"

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

check-params: $(STAMP)
	$(PY) -m seglab check-params --profile demo
	$(PY) -m seglab check-params --profile full

report: $(STAMP)
	$(PY) -m seglab report

lint: $(STAMP)
	$(VENV)/bin/ruff check lib tests bench $(wildcard notebooks/*.py)

# notebooks/jupytext.toml pairs every notebook with a percent-format script; --sync updates
# the older file of each pair from the newer one (tests/test_notebook_pairs.py checks they agree).
sync-notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb

readme-numbers: $(STAMP)
	$(PY) -m seglab readme-numbers --profile $(PROFILE)

bench: $(STAMP)
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# Works as root (--allow-root); the token is printed so it can be pasted into a browser
# or an SSH-tunnelled session (ssh -L $(PORT):127.0.0.1:$(PORT) node).
lab: $(STAMP)
	@token=$$($(PY) -c 'import secrets; print(secrets.token_hex(16))'); \
	echo "JupyterLab: http://127.0.0.1:$(PORT)/lab?token=$$token"; \
	echo "token: $$token"; \
	$(VENV)/bin/jupyter lab --no-browser --allow-root --ip=127.0.0.1 --port=$(PORT) \
	  --ServerApp.root_dir=$(CURDIR) --IdentityProvider.token=$$token
