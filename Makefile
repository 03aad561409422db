# spie: the two commands a new user runs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: install demo toy-editor test test-containers lint format protos bench chaos clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Without CUDA, take the CPU build of torch first so nothing pulls a multi-GB CUDA wheel.
$(STAMP): $(PY) pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA found: installing the default torch build"; $(PIP) install -q torch; \
	else \
	  echo "no CUDA: installing torch==2.13.0 (CPU build)"; $(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Each demo run gets its own folder (runs/demo-<time>), so running it again loses nothing.
demo: $(STAMP)
	$(VENV)/bin/spie train --config $(CONFIG) --set run.name=demo-$$(date +%Y%m%d-%H%M%S)

# Regenerate the toy editor shipped in models/toy-editor (supervised fine-tuning, CPU, ~15 min).
toy-editor: $(STAMP)
	$(VENV)/bin/spie sft --config configs/sft-toy.yaml

# ruff, then the layer contracts in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: $(STAMP)
	$(PY) protos/generate.py

test: $(STAMP) lint
	$(PY) -m pytest -q tests

# The images built and docker-compose.yml's CPU profile run for real with rootful podman (no Docker
# engine, no registry): deploy/containers/README.md. Slow (minutes), so not part of `make test`.
test-containers: $(STAMP)
	@command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc debootstrap; }
	@$(PY) -c 'import podman_compose' 2>/dev/null || $(PIP) install -q podman-compose
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -s --run-containers tests/containers

bench: $(STAMP)
	$(PY) bench/sampler_overhead.py
	$(PY) bench/reward_server.py
	$(PY) bench/queue.py
	$(PY) bench/overlap.py

chaos: $(STAMP)
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) runs .pytest_cache
