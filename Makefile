# The README's two commands: `make study` (the embedded-default study) and `make test` (the tests).
# Both create .venv and install the pinned stack first (requirements.lock; torch 2.14.1 + torchvision 0.29.1).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install study test test-fast clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e .
	$(BIN)/python -c "from deconver.nn import ndc_cpu; ndc_cpu.available()"  # build the NDC's CPU kernels now (warns without a compiler)
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)  ## run the embedded-default study end to end (config/config.yaml)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores all

test: $(STAMP)  ## the whole test suite, as CI runs it
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

test-fast: $(STAMP)  ## everything but the slow real-data and end-to-end tests
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf results reports logs .snakemake
