#!/usr/bin/env bash
# Install Debian packages: scripts/apt-install.sh PACKAGE...  (as root)
# One apt at a time: in CI the matrix's venvs (scripts/venv.sh, for a Python without venv) are set
# up beside the daemon tests' setup (scripts/test.sh runs scripts/setup.sh), and a second apt-get
# fails at once on apt's own lock instead of waiting for it.
set -euo pipefail
exec 9>/run/lock/arservice-apt.lock
flock 9
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
