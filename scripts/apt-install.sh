#!/usr/bin/env bash
# Installs Debian packages (as root, or with password-less sudo) without starting their system services:
# the project runs nginx, coturn and chromium itself, on its own ports. Usage: scripts/apt-install.sh PKG...
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "$* missing and this user can neither run apt-get (not root) nor sudo without a password" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d answering 101 tells the packages' scripts not to start services.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
# Other jobs may hold the dpkg lock for a while: wait for it rather than fail.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@"
