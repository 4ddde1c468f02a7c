#!/usr/bin/env bash
# Install arservice, and what its tests need, into a virtual environment of its own; as root on
# Debian/Ubuntu also install the system packages and start the daemons the tests use.
# Idempotent: safe to run again. Usage: scripts/setup.sh [--no-system]
#   --no-system  only the package and its test tools (no apt, no daemons): enough for the local runner.
# Environment: PYTHON (the interpreter the venv is made from; default the first python3 >= 3.10
# on PATH), ARSERVICE_VENV (where the venv goes; default .venv in the checkout).
# Never installs into the system Python: Debian and Ubuntu forbid it (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }
venv=${ARSERVICE_VENV:-$PWD/.venv}

usage() { log "usage: scripts/setup.sh [--no-system]"; exit 2; }
system=yes
[ $# -le 1 ] || usage
case "${1:-}" in
  --no-system) system=no ;;
  "") ;;
  *) usage ;;
esac
if [ "$system" = yes ] && { [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; }; then
  log "not root on Debian/Ubuntu: no system packages or daemons (the local runner and the core tests need none)"
  system=no
fi

if [ "$system" = yes ]; then
  need=()
  for pkg in bash procps curl docker.io busybox-static debootstrap bubblewrap podman runc catatonit \
             slurm-wlm munge openssh-server iproute2 chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    scripts/apt-install.sh "${need[@]}"
  fi
fi

scripts/venv.sh "$venv"

# The full setup (the tests') also installs the optional litellm and mini-swe-agent extras, so their
# integrations are tested; the core suite (scripts/test-matrix.sh) runs without them. The lint
# extra (ruff, mypy: scripts/lint.sh) goes in either way.
extras=test,lint
[ "$system" = yes ] && extras=test,lint,litellm,minisweagent
# pip runs only when something is missing: pyproject.toml changed since the last install, or an
# extra asked for now was not installed then. The package is editable, so code edits need none.
stamp="$venv/.arservice-setup"  # line 1: checksum of pyproject.toml; line 2: the extras installed
sum=$(cksum < pyproject.toml)
installed=
[ "$(sed -n 1p "$stamp" 2>/dev/null)" = "$sum" ] && installed=$(sed -n 2p "$stamp")
for extra in ${extras//,/ }; do
  if [[ ",$installed," != *",$extra,"* ]]; then
    log "pip install -e .[$extras] into $venv"
    PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
    printf '%s\n%s\n' "$sum" "$extras" > "$stamp"
    break
  fi
done

if [ "$system" = yes ]; then
  scripts/docker-up.sh
  scripts/podman-up.sh
  scripts/slurm-up.sh
  ssh-keygen -A >/dev/null  # host keys for the tests' sshd on loopback (the Slurm runner over SSH)
fi

log "ready: run $venv/bin/arservice (or '. $venv/bin/activate' first, then arservice)"
