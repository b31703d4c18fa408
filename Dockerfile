# The classifier's images. Targets:
#
#   runtime  (default)  CPU image: ONNX Runtime, models exported at build time, no torch
#   gpu                 x86-64 + NVIDIA GPU: onnxruntime-gpu and TensorRT; engines built at first start
#   jetson              NVIDIA Jetson (arm64): TensorRT from the JetPack base; engines built on the device
#   loadgen             the load generator (benchmarks/), for docker-compose's `load` profile
#
#   docker build -t efficient-cnn-classifier .
#   docker build --platform linux/arm64 -t efficient-cnn-classifier:arm64 .  (the CPU image for arm64)
#   docker build --target gpu -t efficient-cnn-classifier:gpu .
#   docker build --target jetson -t efficient-cnn-classifier:jetson .      (on a Jetson, or buildx)
#
# Build arguments: BASE_IMAGE (CPU and export stages), GPU_BASE_IMAGE, JETSON_BASE_IMAGE, WEIGHTS
# (auto|imagenet|random, passed to build_engines.py --weights), MODELS (space-separated names),
# NVIDIA_INDEX_URL (the gpu stage's TensorRT libraries: published only on NVIDIA's package index).
# pip reads PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS from the environment: pass them as
# build arguments to use a mirror, a local wheel directory served over HTTP, or a CPU-only torch
# index for the export stage (the plain torch wheel for x86-64 Linux pulls several GB of CUDA
# libraries that the export does not need).
#
# runtime is the last stage, so `docker build .` gives the CPU image. Build with BuildKit (the default
# since Docker 23 and in Compose v2): it builds only the stages a target needs. The legacy builder
# builds, and pulls the bases of, every stage above the target, the GPU ones included; on older
# engines set DOCKER_BUILDKIT=1 (with docker-compose 1.x also COMPOSE_DOCKER_CLI_BUILD=1).

ARG BASE_IMAGE=python:3.11-slim
# The export stage runs on the machine that builds (BUILDPLATFORM), whatever platform the image is for:
# ONNX files are the same on every architecture, so an arm64 image built on x86-64 exports natively
# rather than running torch under emulation. A multi-platform base (python:3.11-slim) serves both; a
# single-platform local base needs this machine's own here (deploy/image_test.py --platform does so).
ARG EXPORT_BASE_IMAGE=${BASE_IMAGE}
# The `gpu` extra's stack (deploy/gpu_stacks.toml): onnxruntime-gpu 1.26.0 is built for CUDA 12.8
# and cuDNN 9, which this base provides on the loader path (ONNX Runtime's providers find their
# libraries there); TensorRT 10 (>= 10.14.1, what the TensorRT provider was compiled against) comes
# from NVIDIA's package index. Ubuntu 24.04, Python 3.12.
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# Needs Python >= 3.11 and the TensorRT Python bindings: the arm64 (SBSA) TensorRT image runs on
# JetPack 7 devices (CUDA 13, TensorRT 10, Python 3.12; the `jetson` extra's cuda-python is pinned to
# CUDA 13); JetPack 6 bases (l4t-jetpack r36: CUDA 12.6, TensorRT 10.3) ship Python 3.10, which this
# project does not support.
ARG JETSON_BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.08-py3

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app

# ---------------------------------------------------------------------------------------------
# Export: PyTorch definitions -> ONNX models and manifests. Only /export leaves this stage.
FROM --platform=${BUILDPLATFORM} ${EXPORT_BASE_IMAGE} AS export
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
COPY pyproject.toml deploy/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py --pyproject /tmp/deps/pyproject.toml --extra build > /tmp/deps/build.txt \
    && python -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir -r /tmp/deps/build.txt
COPY contract/ /app/contract/
COPY models/ /app/models/
COPY service/ /app/service/
COPY build_engines.py /app/
COPY builder/ /app/builder/
ARG WEIGHTS=auto
ARG MODELS="mobilenet_v1 mobilenet_v2 shufflenet_v1 shufflenet_v2"
# hadolint ignore=SC2086
RUN /opt/export/bin/python build_engines.py --models ${MODELS} --weights "${WEIGHTS}" \
        --target cpu --out /export/model_repository

# ---------------------------------------------------------------------------------------------
# The serving dependencies only (no torch, no onnx exporter), in a virtualenv copied into runtime.
FROM base AS runtime-venv
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
COPY pyproject.toml deploy/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py --pyproject /tmp/deps/pyproject.toml > /tmp/deps/runtime.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/deps/runtime.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------
# Load generator: the serving dependencies, the `bench` extra if pyproject defines one, benchmarks/.
FROM runtime-venv AS loadgen
RUN python /tmp/deps/requirements.py --pyproject /tmp/deps/pyproject.toml --extra-if-present bench \
        > /tmp/deps/bench.txt \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir -r /tmp/deps/bench.txt
COPY contract/ /app/contract/
COPY models/ /app/models/
COPY service/ /app/service/
COPY benchmarks/ /app/benchmarks/
# A named volume mounted here starts with this directory's owner, so the results stay writable.
RUN mkdir -p /app/benchmarks/results && chown 10001:10001 /app/benchmarks/results
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
USER 10001:10001
ENTRYPOINT ["python", "-m", "benchmarks.load"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# GPU (x86-64): ONNX Runtime with the CUDA and TensorRT execution providers, plus native TensorRT
# (the same TensorRT, from pip). Engines are built at container start (deploy/entrypoint.sh) into
# MODEL_REPOSITORY=/cache/engines: mount a volume there so that restarts reuse them.
FROM ${GPU_BASE_IMAGE} AS gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG NVIDIA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml deploy/requirements.py /tmp/deps/
# onnxruntime-gpu replaces onnxruntime: the two packages install the same module. The extra's CUDA
# and cuDNN wheels are left out: the base image has those libraries (CUDA 12.8, cuDNN 9) where the
# loader looks. TensorRT's libraries come from NVIDIA's index (an unreachable one fails the build) and
# are added to the loader's path, so that ONNX Runtime's TensorRT provider finds libnvinfer.so.10.
RUN python3 /tmp/deps/requirements.py --pyproject /tmp/deps/pyproject.toml --extra gpu --exclude onnxruntime \
        --exclude nvidia-cuda-runtime-cu12 --exclude nvidia-cublas-cu12 --exclude nvidia-cuda-nvrtc-cu12 \
        --exclude nvidia-cufft-cu12 --exclude nvidia-curand-cu12 --exclude nvidia-cudnn-cu12 \
        > /tmp/deps/gpu.txt \
    && python3 -m venv /opt/venv \
    && test -n "${NVIDIA_INDEX_URL}" || { echo "set --build-arg NVIDIA_INDEX_URL (NVIDIA's package index, for TensorRT)" >&2; exit 1; } \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${NVIDIA_INDEX_URL}" -r /tmp/deps/gpu.txt \
    && /opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'] + '/tensorrt_libs')" \
        > /etc/ld.so.conf.d/tensorrt-pip.conf \
    && ldconfig
WORKDIR /app
COPY contract/ /app/contract/
COPY models/ /app/models/
COPY service/ /app/service/
COPY build_engines.py /app/
COPY builder/ /app/builder/
# benchmarks/: the generated calibration photos (int8 builds) and `python -m benchmarks.gpu_selftest`.
COPY benchmarks/ /app/benchmarks/
COPY deploy/entrypoint.sh /app/deploy/entrypoint.sh
COPY --from=export /export/model_repository/ /app/model_repository/
RUN groupadd --system --gid 10001 classifier \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin classifier \
    && mkdir -p /cache/engines && chown 10001:10001 /cache/engines
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    MODEL_REPOSITORY=/cache/engines \
    ENGINE_TARGET=gpu \
    BACKEND=auto
USER 10001:10001
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Generous start period: the first start builds the engines (minutes on a small GPU).
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["/bin/sh", "/app/deploy/entrypoint.sh"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# Jetson (arm64): TensorRT from the base image, ONNX Runtime (CPU) as the fallback backend, cuda-python
# (the `jetson` extra, pinned to the base's CUDA 13) for the native TensorRT backend's buffers. The
# ONNX models are architecture-independent; the engines are built on the device at first start.
FROM ${JETSON_BASE_IMAGE} AS jetson
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml deploy/requirements.py /tmp/deps/
RUN python3 /tmp/deps/requirements.py --pyproject /tmp/deps/pyproject.toml --extra jetson > /tmp/deps/runtime.txt \
    && python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/deps/runtime.txt
WORKDIR /app
COPY contract/ /app/contract/
COPY models/ /app/models/
COPY service/ /app/service/
COPY build_engines.py /app/
COPY builder/ /app/builder/
# benchmarks/: the generated calibration photos (int8 builds) and `python -m benchmarks.gpu_selftest`.
COPY benchmarks/ /app/benchmarks/
COPY deploy/entrypoint.sh /app/deploy/entrypoint.sh
COPY --from=export /export/model_repository/ /app/model_repository/
RUN groupadd --system --gid 10001 classifier \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin classifier \
    && mkdir -p /cache/engines && chown 10001:10001 /cache/engines
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    MODEL_REPOSITORY=/cache/engines \
    ENGINE_TARGET=jetson \
    BACKEND=auto
USER 10001:10001
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["/bin/sh", "/app/deploy/entrypoint.sh"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime (the default target): serving dependencies, the service code and the exported models.
FROM base AS runtime
RUN groupadd --system --gid 10001 classifier \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin classifier
COPY --from=runtime-venv /opt/venv /opt/venv
COPY contract/ /app/contract/
COPY models/ /app/models/
COPY service/ /app/service/
COPY build_engines.py /app/
COPY builder/ /app/builder/
COPY --from=export /export/model_repository/ /app/model_repository/
# Byte-compile now: the root filesystem is read-only at run time (Kubernetes), and a cold import
# would otherwise compile on every start.
RUN /opt/venv/bin/python -m compileall -q /app/contract /app/models /app/builder /app/service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    MODEL_REPOSITORY=/app/model_repository
USER 10001:10001
EXPOSE 8000 8001
# The server drains in-flight requests on SIGTERM (bounded by SHUTDOWN_GRACE_S), then exits.
STOPSIGNAL SIGTERM
# Liveness only: /readyz (models loaded and warmed) is for orchestrators that route traffic.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
