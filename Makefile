# Two commands do everything, on a fresh machine with only Python 3.11:
#   make demo   create .venv, install, run the local dry run (runs/dryrun/)
#   make test   create .venv, install, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: demo test install
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pixeldiff-launch run manifests/dryrun.yaml

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q
