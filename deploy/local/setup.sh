#!/usr/bin/env bash
# Installs what the local fleet runs beside the replicas: Debian's nginx (the proxy) and coturn (the TURN relay).
# Neither is started as a system service: `streamedit fleet` runs both in the foreground with its own configs.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v turnserver >/dev/null 2>&1 || [ -x /usr/bin/turnserver ] || missing+=(coturn)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    else
      echo "${missing[*]} missing and this user can neither run apt-get (not root) nor sudo without a password" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: install the packages without starting their system services.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}"
fi
/usr/sbin/nginx -v
/usr/bin/turnserver --version 2>/dev/null | head -1 || true
