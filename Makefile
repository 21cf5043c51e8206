# The two commands at the top of README.md: `make dev` and `make test`.
# Each creates .venv on first use, so they work on a fresh machine with python3 (>= 3.11).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: dev test venv bench soak clean wheel lock

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

# dist/: the sdist and the wheel with the compiled extensions, built with the hash-locked build
# requirements only (deploy/build-wheel.sh; needs a C compiler and Python's headers).
wheel:
	PYTHON=$(PYTHON) deploy/build-wheel.sh dist

# Refreshes the hash-locked requirements (pip-tools' pip-compile, into .venv): deploy/requirements.lock
# (derpd's runtime dependencies) and deploy/build-requirements.lock (what builds the wheel).
# Pins for the interpreter that runs it (CI's: Debian bookworm's Python 3.11 on Linux x86_64).
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock: $(STAMP)
	$(VENV)/bin/pip install --quiet 'pip-tools>=7.4'
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --upgrade \
	    --output-file deploy/requirements.lock pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) --upgrade \
	    --output-file deploy/build-requirements.lock deploy/build-requirements.in

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
