#!/usr/bin/env bash
# Lint: ruff (pyflakes, bugbear, pyupgrade, isort) on the package, tests, benchmarks and examples,
# and mypy on the package, both configured in pyproject.toml. Needs the lint extra (scripts/setup.sh installs it). Usage: scripts/lint.sh
# Environment: ARSERVICE_VENV (the venv with ruff and mypy; default .venv in the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ARSERVICE_VENV:-$PWD/.venv}
"$venv/bin/ruff" check arservice tests bench examples
"$venv/bin/mypy" arservice
