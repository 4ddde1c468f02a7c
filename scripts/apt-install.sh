#!/usr/bin/env bash
# Install Debian packages: scripts/apt-install.sh PACKAGE...  (as root)
# One apt at a time: in CI the system setup, the matrix's venvs (scripts/venv.sh, for a Python
# without venv) and the wheel check run side by side, and a second apt-get fails at once on apt's
# own lock instead of waiting for it.
set -euo pipefail
exec 9>/run/lock/arservice-apt.lock
flock 9
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
