# The two commands at the top of README.md: `make dev` and `make test`.
# Each creates .venv on first use, so they work on a fresh machine with python3 (>= 3.11).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: dev test venv bench soak clean

$(STAMP): pyproject.toml setup.py derpd/_speedups.c derpd/_dataplane.c stund/_mmsg.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

dev: $(STAMP)
	$(VENV)/bin/derpd dev

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# 10-minute soak of one relay process (not part of `make test`): docs/security.md.
soak: $(STAMP)
	$(VENV)/bin/python tests/soak/soak_relay.py --clients 1000 --minutes 10

bench: $(STAMP)
	$(VENV)/bin/python bench/relay.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
