#!/usr/bin/env bash
# The test command: set up, then run the whole suite with the virtual environment's Python.
# Not root, setup starts no daemons, so only the core suite runs (pytest --core: every test that
# needs no docker, podman, bwrap, Slurm or sshd). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
core=()
if [ "$(id -u)" != 0 ]; then
  echo "test: not root: the core suite only (pytest --core)" >&2
  core=(--core)
fi
exec "${ARSERVICE_VENV:-$PWD/.venv}/bin/python" -m pytest "${core[@]}" "$@"
