#!/bin/sh
# Entrypoint of the GPU and Jetson images.
#
# A TensorRT engine is valid only for the GPU, TensorRT version, precision and batch profile it was
# built with, so engines cannot be baked into an image built elsewhere: they are built here, on the
# machine that serves them, into a cache directory that should be a volume so that a restart reuses
# them (build_engines.py skips outputs that are already up to date).
#
#   entrypoint.sh serve          build the engines unless SKIP_ENGINE_BUILD=1, then serve (default)
#   entrypoint.sh build-engines  only build them (the Kubernetes init container)
#   entrypoint.sh CMD [ARG ...]  run CMD instead (a shell, a one-off command)
#
# Environment:
#   MODEL_REPOSITORY   working repository: ONNX models, manifests and engines (default /cache/engines)
#   ENGINE_TARGET      gpu | jetson (set by the image)
#   MODELS             comma-separated models to build and serve (default: every model in the image)
#   ENGINE_BUILD_ARGS  extra build_engines.py arguments, e.g. "--precision fp16 --max-batch 16"
#   SKIP_ENGINE_BUILD  1: serve what MODEL_REPOSITORY already holds
#   PORT               listening port (default 8000)
#   IMAGE_MODEL_REPOSITORY  the ONNX models built into the image (default /app/model_repository)
set -eu

BAKED=${IMAGE_MODEL_REPOSITORY:-/app/model_repository}
: "${MODEL_REPOSITORY:=/cache/engines}"
: "${ENGINE_TARGET:=gpu}"
: "${ENGINE_BUILD_ARGS:=}"
: "${SKIP_ENGINE_BUILD:=0}"
: "${PORT:=8000}"
export MODEL_REPOSITORY

log() { echo "entrypoint: $*" >&2; }

# Copy the image's ONNX models and manifests into the working repository. A model whose ONNX file
# is unchanged keeps its directory (and its engines); a changed one (a new image) is replaced whole.
seed() {
    mkdir -p "$MODEL_REPOSITORY"
    for src in "$BAKED"/*/; do
        name=$(basename "$src")
        dst="$MODEL_REPOSITORY/$name"
        if cmp -s "$src/model.onnx" "$dst/model.onnx"; then
            continue
        fi
        log "seeding $name into $MODEL_REPOSITORY"
        rm -rf "$dst.tmp" "$dst"
        cp -R "$src" "$dst.tmp"
        mv "$dst.tmp" "$dst"
    done
}

build_engines() {
    seed
    models=$(printf '%s' "${MODELS:-}" | tr ',' ' ')
    if [ -z "$models" ]; then
        for src in "$BAKED"/*/; do
            models="$models $(basename "$src")"
        done
    fi
    log "building $ENGINE_TARGET engines for: $models"
    # shellcheck disable=SC2086  # word splitting of the model list and extra arguments is intended
    python /app/build_engines.py --models $models --target "$ENGINE_TARGET" \
        --out "$MODEL_REPOSITORY" $ENGINE_BUILD_ARGS
}

command=${1:-serve}
case "$command" in
    serve)
        if [ "$SKIP_ENGINE_BUILD" != 1 ]; then
            build_engines
        fi
        exec python -m service --host 0.0.0.0 --port "$PORT"
        ;;
    build-engines)
        build_engines
        ;;
    *)
        exec "$@"
        ;;
esac
