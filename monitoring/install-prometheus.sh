#!/bin/sh
# Makes promtool and the prometheus server available for the monitoring tests.
# Idempotent: does nothing when both are already on PATH. Uses Debian's package, the only
# Prometheus build the CI machines can install.
set -eu

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus.sh: promtool/prometheus not found and apt-get is unavailable;" >&2
    echo "install Prometheus (>= 2.42) so that 'promtool' and 'prometheus' are on PATH" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-prometheus.sh: need root (or sudo) to apt-get install prometheus" >&2
        exit 1
    fi
fi

# The package's postinst starts a systemd unit where systemd runs; the tests start their own
# server on a free port, so that unit is harmless.
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus; }; then
    echo "install-prometheus.sh: 'apt-get install prometheus' failed" >&2
    exit 1
fi

for tool in promtool prometheus; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-prometheus.sh: '$tool' still not on PATH after installing the package" >&2
        exit 1
    fi
done
