# Two commands on a fresh machine with only Python:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fabdistill-installed

.PHONY: demo test install clean-venv bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# `make demo VERBOSE=1` shows Ray's own logs too (they always go to runs/demo/console.log)
demo: $(STAMP)
	$(PY) -m apps.demo $(if $(VERBOSE),--verbose) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
