#!/bin/sh
# Installs the Debian packages named as arguments with apt-get (through sudo when not root). The
# callers decide what is missing; this script owns how it is installed.
#
#   deploy/apt-install.sh PACKAGE...
set -eu

[ "$#" -gt 0 ] || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-install.sh: install $* with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "apt-install.sh: need root (or sudo) to install $*" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "apt-install.sh: apt-get install $*"
# The package scripts may try to start services (prometheus's does, where systemd runs); the tests
# start their own on free ports, so that is harmless.
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
