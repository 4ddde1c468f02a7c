#!/usr/bin/env bash
# Install arservice and what its tests need on a fresh Debian machine; start the daemons.
# Idempotent: safe to run again. Usage: scripts/setup.sh [--no-system]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--no-system" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in bash procps; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

echo "setup: installing arservice (pip install -e .[test])"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
