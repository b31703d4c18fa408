#!/bin/sh
# Makes promtool and the prometheus server available for the monitoring tests.
# Idempotent: does nothing when both are already on PATH. Uses Debian's package, the only
# Prometheus build the CI machines can install.
set -eu

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

sh "$(dirname "$0")/../deploy/apt-install.sh" prometheus

for tool in promtool prometheus; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-prometheus.sh: '$tool' still not on PATH after installing the package" >&2
        exit 1
    fi
done
