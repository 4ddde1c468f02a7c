#!/usr/bin/env bash
# CI: the core suite (pytest --core: every test that needs no system daemon) on each Python from
# 3.10 to 3.13, in a venv of its own per version (.venv-3.1x, reused).
# The default Python (the one in .venv) is left out: scripts/test.sh runs the full suite there.
# Usage: scripts/test-matrix.sh [--jobs N] [VERSION...]  Extra pytest arguments: PYTEST_ARGS.
# --jobs N runs at most N suites at a time (default: all). CI runs the matrix beside the full
# suite with --jobs 1: with two core suites beside it, test_lifecycle's fail-fast test failed in
# all three of them (a ping to a SIGSTOPped broker was answered), and not with one.
# A version is skipped, saying so, only when no interpreter for it is found: pyenv's
# ($PYENV_ROOT/versions/3.1x.y/bin/python, newest first), else python3.1x on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test-matrix: $*" >&2; }
max_jobs=99
if [ "${1:-}" = --jobs ]; then max_jobs=$2; shift 2; fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
default=$("${ARSERVICE_VENV:-$PWD/.venv}/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)

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
    log "Python $version: left out here, the full suite runs on it (scripts/test.sh)"
    continue
  fi
  if ! python=$(interpreter "$version"); then
    log "Python $version: SKIPPED: no interpreter found (pyenv's versions/$version.*, python$version on PATH)"
    continue
  fi
  venv=$PWD/.venv-$version
  log "Python $version ($python): the core suite in $venv"
  ARSERVICE_VENV=$venv PYTHON=$python scripts/setup.sh --no-system || { failed+=("$version (setup)"); continue; }
  # Each suite starts at another third of the test modules (tests/conftest.py), so side by side
  # they rarely run the same test at once.
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  (status=0
   ARSERVICE_CORE_ROTATE=$started/3 "$venv/bin/python" -m pytest --core -q -p no:cacheprovider ${PYTEST_ARGS:-} \
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
