# Everything a fresh machine needs goes through these targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPO   ?= model_repository
MODELS ?= mobilenet_v1 mobilenet_v2 shufflenet_v1 shufflenet_v2
WEIGHTS ?= auto
HOST   ?= 0.0.0.0
PORT   ?= 8000

.PHONY: help venv install models run test test-tools test-image test-arm64 soak lint format clean gpu-install gpu-selftest audit

help:
	@echo "make run    - create .venv, install, build the model repository, serve on :$(PORT)"
	@echo "make test   - create .venv, install, run ruff and the whole test suite"
	@echo "make bench  - in-process and served speed of every model, report under benchmarks/results/"
	@echo "make bench-reload - a model reloaded every few seconds under load: p50/p99 with and without a reload"
	@echo "make tune   - the best batching, threads and precision per model on this machine -> MODEL_CONFIG file"
	@echo "make models - (re)build the model repository only (WEIGHTS=auto|imagenet|random|PATH)"
	@echo "make audit  - pip-audit the runtime dependencies (known vulnerabilities; needs network access)"
	@echo "make soak   - a real server under steady mixed load for SOAK_S seconds (default 600): errors, p99, memory"
	@echo "make test-arm64   - the service and its image on aarch64 under emulation (root; not part of make test)"
	@echo "make gpu-install  - NVIDIA GPU: swap onnxruntime for onnxruntime-gpu, add TensorRT and cuda-python"
	@echo "make gpu-selftest - NVIDIA GPU / Jetson: build engines, check every GPU backend, benchmark"

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

# In-process runtime cost, the served path under the load generator (/classify, and the Open Inference
# Protocol over HTTP and gRPC beside it), the ratio between them, the ShuffleNet v2 experiments; report,
# chart and JSON in benchmarks/results/<timestamp>/ (17 min on 2 cores without the experiments, which add a few).
.PHONY: bench
bench: models
	$(PY) build_engines.py --models $(MODELS) --weights $(WEIGHTS) --out $(REPO) --precision fp16 int8
	$(PY) -m benchmarks.bench --repository $(REPO) --models $(MODELS)

# One model under concurrency 16 for RELOAD_S seconds while version 2 of it is moved in and out of a
# scratch copy of the repository and loaded through the repository API every few seconds: latency in
# the windows with a reload against the windows without, and every answer checked (about 1.5 min).
RELOAD_MODEL ?= shufflenet_v2
RELOAD_S     ?= 60
.PHONY: bench-reload
bench-reload: models
	$(PY) -m benchmarks.reload --repository $(REPO) --model $(RELOAD_MODEL) --duration $(RELOAD_S)

# The best batching, threads and precision of each model on this machine (benchmarks/tune.py): the real
# server under the load generator, a pruned search within TUNE_BUDGET_S seconds per model (the four
# models in about 15 minutes on 2 cores), TUNE_P99_MS a p99 bound (none: the most requests/s).
# Writes model_config.toml (serve with MODEL_CONFIG=...), report.md and tune.png under benchmarks/results/.
TUNE_BUDGET_S ?= 210
TUNE_P99_MS   ?=
.PHONY: tune
tune: models
	$(PY) build_engines.py --models $(MODELS) --weights $(WEIGHTS) --out $(REPO) --precision fp16 int8
	$(PY) -m benchmarks.tune --repository $(REPO) --models $(MODELS) --budget-s $(TUNE_BUDGET_S) \
		$(if $(TUNE_P99_MS),--p99-ms $(TUNE_P99_MS))

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
	sh benchmarks/install-chromium.sh $(VENV)

test: test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q
	$(PY) deploy/image_test.py

# Known vulnerabilities in the runtime dependencies as installed (pip-audit --strict): a package that
# cannot be checked - no network, a mirror without the vulnerability data - fails this step too.
# Not part of `make test`: the package index reachable from CI serves no per-release vulnerability
# data, so every package would be 'not found'. Run it where the public index is reachable.
audit: $(VENV)/.installed
	$(PY) deploy/audit.py

# A real server under a steady mix of models and of good and bad input; fails on an unexpected 5xx, a
# lost request or memory growth over the bound (tests/soak.py). SOAK_S=60 for a short run.
SOAK_S    ?= 600
SOAK_RATE ?= 20
soak: $(VENV)/.installed
	$(PY) -m tests.soak --duration $(SOAK_S) --rate $(SOAK_RATE)

# Builds the runtime image with a local Docker engine, classifies through it, stops it.
test-image: $(VENV)/.installed
	$(PY) deploy/image_test.py

# aarch64 (Jetson's CPU side, Graviton, Ampere) under user-mode emulation, as root on x86-64 Debian:
# qemu-user-static, binfmt-support and debootstrap are installed when missing. First an arm64 Debian
# root (kept in .cache/arm64) with the runtime dependencies from aarch64 wheels serves the same JPEGs
# as this machine and must answer the same (deploy/arm64_test.py); then the runtime image is built and
# served for linux/arm64 (deploy/image_test.py --platform linux/arm64). Not part of `make test`: the
# emulator makes it slow (see the README's ARM section for the times measured).
test-arm64: $(VENV)/.installed
	$(PY) deploy/arm64_test.py
	$(PY) deploy/image_test.py --platform linux/arm64

# NVIDIA GPUs. onnxruntime and onnxruntime-gpu install the same module, so the CPU package goes first;
# run this again after anything reinstalls the project (make install brings onnxruntime back).
# GPU_EXTRA picks the stack: gpu (CUDA 12) or gpu-cu13 (CUDA 13); deploy/gpu_stacks.toml says why
# each version. TensorRT's libraries are published only on NVIDIA's package index (the packages of
# the same name on the public index download from it while they install), so that index is passed
# explicitly, and checked before anything is removed. NVIDIA_INDEX_URL is that index's URL, as
# NVIDIA's TensorRT installation guide gives it (its pip section), or a mirror of it.
GPU_EXTRA        ?= gpu
NVIDIA_INDEX_URL ?=
gpu-install: $(VENV)/.installed
	@test -n '$(NVIDIA_INDEX_URL)' || { \
		echo "gpu-install: set NVIDIA_INDEX_URL to NVIDIA's Python package index (the URL in NVIDIA's" \
			"TensorRT installation guide, pip section) or a mirror of it: TensorRT's libraries come only" \
			"from there." >&2; exit 1; }
	@$(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=30).close()' \
		'$(NVIDIA_INDEX_URL)/' 2>/dev/null || { \
		echo "gpu-install: NVIDIA's package index $(NVIDIA_INDEX_URL) is unreachable; TensorRT's libraries" \
			"come only from there. Set NVIDIA_INDEX_URL to a reachable mirror of it." >&2; exit 1; }
	$(PY) -m pip uninstall --quiet -y onnxruntime
	$(PY) deploy/requirements.py --extra $(GPU_EXTRA) --exclude onnxruntime > $(VENV)/gpu-requirements.txt
	$(PY) -m pip install --quiet --extra-index-url $(NVIDIA_INDEX_URL) -r $(VENV)/gpu-requirements.txt

# On the GPU machine (or the Jetson): engines for the models, every GPU backend checked against
# ONNX Runtime CPU, throughput and latency at batch 1/8/32/64. No dependency on the venv target: it
# must not reinstall the CPU onnxruntime over onnxruntime-gpu.
SELFTEST_REPO ?= model_repository
gpu-selftest:
	$(PY) -m benchmarks.gpu_selftest --repository $(SELFTEST_REPO) --models $(MODELS) --weights $(WEIGHTS)

clean:
	rm -rf $(REPO) .pytest_cache .ruff_cache
