#!/bin/sh
# Installs what tests/test_page.py needs to drive the page at GET / in a real browser. Idempotent:
# installs only what is missing.
#
#   benchmarks/install-chromium.sh [VENV]       (default: .venv)
#
# System (apt-get): Debian's chromium and a font for it to render text with. Virtualenv (pip):
# playwright, whose Python API drives that chromium over its DevTools protocol. Playwright's own
# browser download (`playwright install`) is never used: the test hands it the system binary.
set -eu

VENV=${1:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "install-chromium.sh: no virtualenv at $VENV (create it first: make install)" >&2
    exit 1
fi

if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "install-chromium.sh: pip install playwright"
    "$PY" -m pip install --quiet "playwright>=1.45"
fi

apt_packages=""
command -v chromium >/dev/null 2>&1 || apt_packages="$apt_packages chromium"
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_packages="$apt_packages fonts-dejavu-core"
# shellcheck disable=SC2086  # one argument per package
sh "$(dirname "$0")/../deploy/apt-install.sh" $apt_packages
