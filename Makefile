# The front door: `make run` serves the tiny CPU model; `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of the Dockerfile's TORCH_VERSION, and where it is when pip's find-links lack it.
TORCH_CPU := 2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: run test lint bench chaos venv redis-server browser lock

venv: $(VENV)/.installed
# The client (clients/python) is installed after the project: an older install of the project
# held the `imagegen` command, and replacing it removes that file.
# torch is the CPU build (PyPI's Linux torch is the CUDA one, with GBs of nvidia-* wheels): a
# wheel of it in pip's find-links is taken first (--no-index asks no index, so without one this
# fails at once), else the one on PyTorch's CPU index; then its dependencies, from the package
# index at the versions of scripts/constraints.txt.
# Every other package at the version in scripts/constraints.txt (what the tests passed with; `make lock`
# records .venv's versions there after an upgrade).
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml scripts/constraints.txt
	scripts/ensure-venv.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	if $(BIN)/pip install -q --no-index --no-deps torch==$(TORCH_CPU) 2>/dev/null; then :; \
	  else $(BIN)/pip install -q --no-deps torch==$(TORCH_CPU) --index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/pip install -q torch==$(TORCH_CPU) -c scripts/constraints.txt
	$(BIN)/pip install -q -e '.[worker,dev]' -c scripts/constraints.txt
	$(BIN)/pip install -q -e ./clients/python -c scripts/constraints.txt
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

# The whole service under load while its processes are killed and restarted, then a check that no
# accepted job was lost (tests/chaos.py; e.g. `make chaos CHAOS_ARGS="--seconds 600 --redis-kill"`).
chaos: venv redis-server
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.chaos $(CHAOS_ARGS)

# After upgrading packages in .venv (and `make test` passing): record their versions for every install.
lock: venv
	scripts/lock.sh
