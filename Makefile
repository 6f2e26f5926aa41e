# The front door: `make run` serves the tiny CPU model; `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench venv redis-server browser

venv: $(VENV)/.installed
# The client (clients/python) is installed after the project: an older install of the project
# held the `imagegen` command, and replacing it removes that file.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	scripts/ensure-venv.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,dev]'
	$(BIN)/pip install -q -e ./clients/python
	touch $@

redis-server:
	scripts/ensure-redis-server.sh

# Debian's chromium for tests/e2e (installed when root; those tests skip without it).
browser:
	scripts/ensure-browser.sh

run: venv
	scripts/run.sh

test: venv redis-server browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# Service vs raw pipeline on the tiny model(s): table on stdout, JSON in bench/results/latest.json.
# Ingress is measured with Debian's wrk (installed here when root; else bench.run names the command).
bench: venv redis-server
	@command -v wrk >/dev/null || scripts/apt-install.sh wrk || true
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run
