#!/usr/bin/env bash
# Install arservice and what its tests need on a fresh Debian machine; start the daemons.
# Idempotent: safe to run again. Usage: scripts/setup.sh [--no-system]
#   --no-system  only pip-install the package (no apt, no daemons): enough for the local runner.
set -euo pipefail
cd "$(dirname "$0")/.."

system=yes
[ "${1:-}" = "--no-system" ] && system=no
if [ "$system" = yes ] && { [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; }; then
  echo "setup: not root on Debian: skipping system packages and daemons" >&2
  system=no
fi

if [ "$system" = yes ]; then
  need=()
  for pkg in bash procps curl docker.io busybox-static debootstrap bubblewrap podman runc catatonit \
             slurm-wlm munge openssh-server; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# The full setup (the tests') also installs the optional litellm extra, so its client is tested.
extras=test
[ "$system" = yes ] && extras=test,litellm
echo "setup: pip install -e .[$extras]" >&2
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[$extras]"

if [ "$system" = yes ]; then
  scripts/docker-up.sh
  scripts/podman-up.sh
  scripts/slurm-up.sh
  ssh-keygen -A >/dev/null  # host keys for the tests' sshd on loopback (the Slurm runner over SSH)
fi
