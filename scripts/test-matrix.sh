#!/usr/bin/env bash
# CI: the core suite (pytest --core: every test that needs no system daemon) on each Python from
# 3.10 to 3.13, in a venv of its own per version (.venv-3.1x, reused).
# The default Python (the one in .venv) is left out unless named: scripts/test.sh runs the full
# suite there. Named, its core suite runs in .venv as setup.sh made it (CI runs it so, beside
# `pytest --daemons`: the full suite in two parts).
# Usage: scripts/test-matrix.sh [--jobs N] [VERSION...]  Extra pytest arguments: PYTEST_ARGS.
# --jobs N runs at most N suites at a time (default: all).
# A version is skipped, saying so, only when no interpreter for it is found: pyenv's
# ($PYENV_ROOT/versions/3.1x.y/bin/python, newest first), else python3.1x on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test-matrix: $*" >&2; }
max_jobs=99
if [ "${1:-}" = --jobs ]; then max_jobs=$2; shift 2; fi
default_venv=${ARSERVICE_VENV:-$PWD/.venv}
default=$("$default_venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
versions=("$@")
if [ ${#versions[@]} = 0 ]; then
  for version in 3.10 3.11 3.12 3.13; do
    if [ "$version" = "$default" ]; then
      log "Python $version: left out here, the full suite runs on it (scripts/test.sh)"
    else
      versions+=("$version")
    fi
  done
fi

interpreter() {
  local candidate
  for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/python 2>/dev/null | sort -rV) \
                   $(type -P "python$1" || true); do
    if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$1" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Set up one after the other (pip calls), then run the suites at once (up to --jobs): they
# mostly wait on the services they start, so on 2 cores three take little longer than one. Each
# one's output is printed whole when all are done.
failed=()
ran=()
started=0
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for version in "${versions[@]}"; do
  if [ "$version" = "$default" ]; then
    venv=$default_venv
    log "Python $version: the core suite in $venv"
  elif ! python=$(interpreter "$version"); then
    log "Python $version: SKIPPED: no interpreter found (pyenv's versions/$version.*, python$version on PATH)"
    continue
  else
    venv=$PWD/.venv-$version
    log "Python $version ($python): the core suite in $venv"
    ARSERVICE_VENV=$venv PYTHON=$python scripts/setup.sh --no-system || { failed+=("$version (setup)"); continue; }
  fi
  # Each suite starts at another part of the test modules (tests/conftest.py), so side by side
  # they rarely run the same test at once.
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  (status=0
   ARSERVICE_CORE_ROTATE=$started/${#versions[@]} "$venv/bin/python" -m pytest --core -q -p no:cacheprovider ${PYTEST_ARGS:-} \
     </dev/null >"$logs/$version" 2>&1 || status=$?
   echo $status >"$logs/$version.status") &
  while [ "$(jobs -rp | wc -l)" -ge "$max_jobs" ]; do wait -n || true; done
  started=$((started + 1))
  ran+=("$version")
done
wait

for version in "${ran[@]}"; do
  status=$(cat "$logs/$version.status")
  log "Python $version: the core suite $([ "$status" = 0 ] && echo passed || echo "FAILED ($status)"):"
  cat "$logs/$version"
  [ "$status" = 0 ] || failed+=("$version")
done

if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: the core suite on Python ${failed[*]}"
  exit 1
fi
