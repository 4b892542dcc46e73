# licforge: two commands on a fresh machine (Python 3.11 + a C++ compiler).
#   make demo   set up .venv if needed, then run the main flow on the embedded default
#   make test   set up .venv if needed, then run the whole test suite (JOBS=2 pytest workers)
# Both are idempotent: the install step re-runs only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.licforge-installed
JOBS   ?= 2

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "licforge needs Python 3.11 (torch==2.14.1 wheels); set PYTHON=/path/to/python3.11"'
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/licforge flow

test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(JOBS) --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/licforge bench all

clean:
	rm -rf build
