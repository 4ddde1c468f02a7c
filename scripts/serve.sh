#!/usr/bin/env bash
# Set up and run the service on its default: the local runner. Extra arguments go to arservice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-system  # the local runner needs only the package; scripts/setup.sh adds docker & co.
exec arservice --runner local "$@"
