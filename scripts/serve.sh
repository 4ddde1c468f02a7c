#!/usr/bin/env bash
# Set up and run the service on its default: the local runner. Extra arguments go to arservice.
# The package goes into a virtual environment of its own (.venv, or ARSERVICE_VENV); see scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-system  # the local runner needs only the package; scripts/setup.sh adds docker & co.
exec "${ARSERVICE_VENV:-$PWD/.venv}/bin/arservice" --runner local "$@"
