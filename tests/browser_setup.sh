#!/usr/bin/env bash
# Installs what tests/test_browser.py needs on a fresh machine: Debian's chromium (apt) and Python Playwright (pip).
# Playwright's own browser download does not work here, so the test drives /usr/bin/chromium instead.
# Usage: tests/browser_setup.sh [PYTHON]   (PYTHON: the interpreter whose environment gets playwright)
set -euo pipefail

PYTHON="${1:-python3}"

if [ ! -x /usr/bin/chromium ]; then
  "$(dirname "$0")/../scripts/apt-install.sh" chromium
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  # Only the Python package: `playwright install` (its browser download) is not used.
  "$PYTHON" -m pip install --quiet playwright
fi

/usr/bin/chromium --version
"$PYTHON" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
