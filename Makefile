# Everything a fresh machine needs goes through these targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPO   ?= model_repository
MODELS ?= mobilenet_v1 mobilenet_v2 shufflenet_v1 shufflenet_v2
WEIGHTS ?= auto
HOST   ?= 0.0.0.0
PORT   ?= 8000

.PHONY: help venv install models run test test-tools test-image lint format clean

help:
	@echo "make run    - create .venv, install, build the model repository, serve on :$(PORT)"
	@echo "make test   - create .venv, install, run ruff and the whole test suite"
	@echo "make models - (re)build the model repository only (WEIGHTS=auto|imagenet|random|PATH)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[build,dev]'
	touch $@

venv install: $(VENV)/.installed

models: $(VENV)/.installed
	$(PY) build_engines.py --models $(MODELS) --weights $(WEIGHTS) --out $(REPO)

run: models
	MODEL_REPOSITORY=$(REPO) $(PY) -m service --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# System tools the tests start for real: Prometheus/promtool, docker-compose, shellcheck, kubectl.
test-tools: $(VENV)/.installed
	sh monitoring/install-prometheus.sh
	sh deploy/install-test-tools.sh $(VENV)

test: test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q
	$(PY) deploy/image_test.py

# Builds the runtime image with a local Docker engine, classifies through it, stops it.
test-image: $(VENV)/.installed
	$(PY) deploy/image_test.py

clean:
	rm -rf $(REPO) .pytest_cache .ruff_cache
