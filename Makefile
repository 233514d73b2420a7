# The two set-up commands: `make demo` runs the product on an embedded broker, `make test` runs
# the whole suite. Both create .venv with Python 3.11 and install what they need first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
HASH := $(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test install install-dev model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core-$(HASH): $(BIN)/python pyproject.toml
	$(PIP) -e .
	rm -f $(VENV)/.core-*; touch $@

$(VENV)/.dev-$(HASH): $(BIN)/python pyproject.toml
	$(PIP) -e '.[dev]'
	rm -f $(VENV)/.dev-* $(VENV)/.core-*; touch $@ $(VENV)/.core-$(HASH)

install: $(VENV)/.core-$(HASH)
install-dev: $(VENV)/.dev-$(HASH)

CDNOW = $$($(BIN)/python -c 'from features.loaders import vendored_cdnow; print(vendored_cdnow())')

# The product end to end on an embedded broker: worker, snapshot sink and API, CDNOW replayed.
# DEMO_ARGS="--exit" stops after the results; "--customers 2000" makes it shorter.
demo: install
	$(BIN)/clv demo $(DEMO_ARGS)

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Rebuild the model that ships in export_onnx/shipped (CDNOW, all data, 6-month horizon).
model: install-dev
	$(BIN)/clv train $(CDNOW) --cutoff 1998-06-30 --horizon-months 6 --out export_onnx/shipped
