# The two set-up commands: `make demo` runs the product on an embedded broker, `make test` runs
# the whole suite. Both create .venv with Python 3.11 and install what they need first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
HASH := $(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test check install install-demo install-dev chromium model screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core-$(HASH): $(BIN)/python pyproject.toml
	$(PIP) -e .
	rm -f $(VENV)/.core-*; touch $@

$(VENV)/.demo-$(HASH): $(BIN)/python pyproject.toml
	$(PIP) -e '.[dashboard]'
	rm -f $(VENV)/.demo-*; touch $@

$(VENV)/.dev-$(HASH): $(BIN)/python pyproject.toml
	$(PIP) -e '.[dev]'
	rm -f $(VENV)/.dev-* $(VENV)/.core-* $(VENV)/.demo-*
	touch $@ $(VENV)/.core-$(HASH) $(VENV)/.demo-$(HASH)

# The browser tests and `clv dashboard --screenshot` drive Debian's Chromium (never a downloaded
# build); installed here when missing (needs root, as on CI).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

install: $(VENV)/.core-$(HASH)
install-demo: $(VENV)/.demo-$(HASH)
install-dev: $(VENV)/.dev-$(HASH) chromium

CDNOW = $$($(BIN)/python -c 'from features.loaders import vendored_cdnow; print(vendored_cdnow())')

# The product end to end on an embedded broker: worker, snapshot sink, API and dashboard, replaying
# a synthetic Online Retail-format file (`clv generate`: its customers have countries, so the
# dashboard shows value by country). DEMO_DATA=cdnow replays the bundled CDNOW file instead (no
# countries), DEMO_DATA=FILE any other. DEMO_ARGS="--exit" stops after the results;
# "--customers 2000" makes it shorter.
DEMO_DATA ?= var/online-retail.csv.gz
DEMO_FILE = $(if $(filter cdnow,$(DEMO_DATA)),,$(DEMO_DATA))

var/online-retail.csv.gz: | install-demo
	mkdir -p $(@D)
	$(BIN)/clv generate --out $@

demo: install-demo $(DEMO_FILE)
	$(BIN)/clv demo $(DEMO_FILE) $(DEMO_ARGS)

# Two test processes (pytest-xdist), each test file whole in one of them: the suite waits on
# worker processes, group joins and browsers more than it computes, so two halve its time on two
# cores. Each process starts its own embedded broker. TEST_PROCESSES=0 runs it in one process.
TEST_PROCESSES ?= 2
test: install-dev
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# Lint, format, types and the import contracts (pyproject.toml): what CI runs before the tests.
check: $(VENV)/.dev-$(HASH)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy
	$(BIN)/lint-imports

# The README's dashboard picture (its Overview tab): the demo's snapshot of the synthetic Online
# Retail-format file's 3,000 first customers, photographed with the model the demo scored them
# with (the one it trains on the file), as the demo's own dashboard shows it.
screenshots: install-dev var/online-retail.csv.gz
	$(BIN)/clv demo var/online-retail.csv.gz --exit --customers 3000 --workdir var/screenshots
	$(BIN)/clv dashboard --snapshot var/screenshots/clv.duckdb --model var/screenshots/model --screenshot docs/dashboard.png

# Rebuild the model that ships in export_onnx/shipped (CDNOW, all data, 6-month horizon).
model: install-dev
	$(BIN)/clv train $(CDNOW) --cutoff 1998-06-30 --horizon-months 6 --out export_onnx/shipped
