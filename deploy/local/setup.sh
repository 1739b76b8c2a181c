#!/usr/bin/env bash
# Installs what the local fleet runs beside the replicas: Debian's nginx (the proxy) and coturn (the TURN relay).
# Neither is started as a system service: `streamedit fleet` runs both in the foreground with its own configs.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/bin/turnserver ] || missing+=(coturn)
if [ ${#missing[@]} -gt 0 ]; then
  scripts/apt-install.sh "${missing[@]}"
fi
/usr/sbin/nginx -v
/usr/bin/turnserver --version 2>/dev/null | head -1 || true
