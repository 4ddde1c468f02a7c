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

# The suites run at once (up to --jobs): they mostly wait on the services they start, so on 2
# cores three take little longer than one. The venvs are set up one at a time (each pip call
# writes arservice.egg-info in the checkout) while the suites already set up run: the default
# venv's first. Every job writes its exit status to $logs/NAME.status as it ends; `wait -n` only
# wakes the loop. Each suite's output is printed whole when all are done.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
job() {  # job NAME COMMAND...: in the background, its output in $logs/NAME
  (status=0; "${@:2}" </dev/null >"$logs/$1" 2>&1 || status=$?; echo $status >"$logs/$1.status") &
}
ended() { [ -e "$logs/$1.status" ]; }
succeeded() { [ "$(cat "$logs/$1.status")" = 0 ]; }

failed=()
ready=()     # versions whose venv is ready and whose suite has not started, in order
to_set_up=() # the others, in order
declare -A venv_of python_of
for version in "${versions[@]}"; do
  if [ "$version" = "$default" ]; then
    venv_of[$version]=$default_venv
    ready=("$version" "${ready[@]}")
    log "Python $version: the core suite in $default_venv"
  elif python_of[$version]=$(interpreter "$version"); then
    venv_of[$version]=$PWD/.venv-$version
    to_set_up+=("$version")
    log "Python $version (${python_of[$version]}): the core suite in ${venv_of[$version]}"
  else
    log "Python $version: SKIPPED: no interpreter found (pyenv's versions/$version.*, python$version on PATH)"
  fi
done

ran=()
setting_up=
while :; do
  if [ -n "$setting_up" ] && ended "$setting_up.setup"; then
    if succeeded "$setting_up.setup"; then
      ready+=("$setting_up")
    else
      log "Python $setting_up: setup FAILED:"; cat "$logs/$setting_up.setup" >&2
      failed+=("$setting_up (setup)")
    fi
    setting_up=
  fi
  if [ -z "$setting_up" ] && [ ${#to_set_up[@]} -gt 0 ]; then
    setting_up=${to_set_up[0]}
    to_set_up=("${to_set_up[@]:1}")
    job "$setting_up.setup" env ARSERVICE_VENV="${venv_of[$setting_up]}" PYTHON="${python_of[$setting_up]}" scripts/setup.sh --no-system
  fi
  running=0
  for version in "${ran[@]}"; do ended "$version" || running=$((running + 1)); done
  while [ $running -lt "$max_jobs" ] && [ ${#ready[@]} -gt 0 ]; do
    version=${ready[0]}
    ready=("${ready[@]:1}")
    # Each suite starts at another part of the test modules (tests/conftest.py), so side by side
    # they rarely run the same test at once.
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    job "$version" env ARSERVICE_CORE_ROTATE=${#ran[@]}/${#versions[@]} \
      "${venv_of[$version]}/bin/python" -m pytest --core -q -p no:cacheprovider ${PYTEST_ARGS:-}
    ran+=("$version")
    running=$((running + 1))
  done
  [ -n "$setting_up" ] || [ $running -gt 0 ] || break
  wait -n || true  # a job that ended just before is seen at the next job's end: a late start, never a lost one
done

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
