#!/usr/bin/env bash
# Lint the package: ruff (pyflakes, bugbear, pyupgrade, isort) and mypy, both configured in
# pyproject.toml. Needs the lint extra (scripts/setup.sh installs it). Usage: scripts/lint.sh
# Environment: ARSERVICE_VENV (the venv with ruff and mypy; default .venv in the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ARSERVICE_VENV:-$PWD/.venv}
"$venv/bin/ruff" check arservice
"$venv/bin/mypy" arservice
