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

# Until the streaming demo lands: profile the shipped CDNOW data and score it with the shipped model.
demo: install
	mkdir -p var
	$(BIN)/clv inspect $(CDNOW)
	$(BIN)/clv score $(CDNOW) --out var/cdnow-scores.csv
	@echo "top 10 customers by predicted 6-month CLV:"
	@sort -t, -k2 -g -r var/cdnow-scores.csv | head -10

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Rebuild the model that ships in export_onnx/shipped (CDNOW, all data, 6-month horizon).
model: install-dev
	$(BIN)/clv train $(CDNOW) --cutoff 1998-06-30 --horizon-months 6 --out export_onnx/shipped
