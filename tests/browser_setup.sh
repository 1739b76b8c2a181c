#!/usr/bin/env bash
# Installs what tests/test_browser.py needs on a fresh machine: Debian's chromium (apt) and Python Playwright (pip).
# Playwright's own browser download does not work here, so the test drives /usr/bin/chromium instead.
# Usage: tests/browser_setup.sh [PYTHON]   (PYTHON: the interpreter whose environment gets playwright)
set -euo pipefail

PYTHON="${1:-python3}"

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    else
      echo "chromium is missing and this user can neither run apt-get (not root) nor sudo without a password" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Other jobs may hold the dpkg lock for a while: wait for it rather than fail.
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  # Only the Python package: `playwright install` (its browser download) is not used.
  "$PYTHON" -m pip install --quiet playwright
fi

/usr/bin/chromium --version
"$PYTHON" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
