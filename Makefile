# Two commands set up and run everything on a fresh machine:
#   make run    the chat server on :8080 (embedded default, no Redis)
#   make test   the whole test suite (installs system packages first when root, and
#               Autobahn|Testsuite from pyenv's Python 2.7.18)
# and one for while you work:
#   make quick  the tests not marked slow (setup.cfg: thousands of clients, tsung,
#               Autobahn, browsers and workers that take 3 s or more each)
# `make pythons` runs the quick tests but the browser ones on Python 3.12 and 3.13, each in a
# virtualenv of its own (.venv-3.12, .venv-3.13) made from pyenv's release; CI (.ci/run)
# runs it for 3.13 only (PYTHONS=3.13).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test quick pythons system-deps autobahn settings-table clean

run: $(VENV)/.installed
	$(BIN)/greenchat serve

test: $(VENV)/.installed system-deps autobahn
	$(BIN)/python -m pytest

quick: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -m "not slow"

pythons: system-deps
	@bash .ci/test-pythons

system-deps:
	@bash .ci/install-system-deps

# Autobahn|Testsuite (Python 2.7) in .autobahn/, for tests/test_autobahn.py
autobahn:
	@bash .ci/install-autobahn

# README.md's settings table, regenerated in place from chat/config.py's SETTINGS
settings-table: $(VENV)/.installed
	@$(BIN)/python -c 'import pathlib, re; from chat.config import settings_table; \
	readme = pathlib.Path("README.md"); text = readme.read_text(); \
	new = re.sub(r"\| key \| default \| type \| meaning \|\n(?:\|.*\n)+", lambda _: settings_table(), text, count=1); \
	readme.write_text(new); print("README.md settings table:", "updated" if new != text else "unchanged")'

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info .pytest_cache .hypothesis .autobahn
