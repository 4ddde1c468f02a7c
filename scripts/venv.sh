#!/usr/bin/env bash
# Make a virtual environment, or reuse the one there: scripts/venv.sh DIR [PYTHON]
# PYTHON (else $PYTHON, else the first python3 >= 3.10 on PATH) is the interpreter it is made from.
# Nothing is ever installed into that Python (Debian and Ubuntu forbid it, PEP 668). Where it lacks
# venv/ensurepip (Debian and Ubuntu ship them apart), root gets the distribution's package;
# anyone else is told which one to ask for.
set -euo pipefail

log() { echo "venv: $*" >&2; }
dir=${1:?usage: scripts/venv.sh DIR [PYTHON]}
python=${2:-${PYTHON:-}}

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }
minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

if [ -n "$python" ]; then
  command -v "$python" >/dev/null || { log "PYTHON=$python: no such command"; exit 1; }
  new_enough "$python" || { log "PYTHON=$python is $("$python" -V 2>&1); arservice needs Python 3.10 or later"; exit 1; }
  explicit=yes
else
  for candidate in $(type -ap python3) $(type -P python3.13 python3.12 python3.11 python3.10 || true); do
    if new_enough "$candidate"; then python=$candidate; break; fi
  done
  [ -n "$python" ] || { log "no python3 >= 3.10 on PATH: install one, or name it with PYTHON=/path/to/python"; exit 1; }
  explicit=no
fi

# Reuse a working venv; remake one that is broken (its Python gone, no pip) or, when PYTHON names
# an interpreter, one made from another Python version.
if [ -f "$dir/pyvenv.cfg" ]; then
  if "$dir/bin/python" -m pip --version >/dev/null 2>&1 && new_enough "$dir/bin/python" \
     && { [ "$explicit" = no ] || [ "$(minor "$dir/bin/python")" = "$(minor "$python")" ]; }; then
    exit 0
  fi
  log "remaking $dir (broken, or not Python $(minor "$python"))"
  rm -rf "$dir"
elif [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
  log "$dir exists and is not a virtual environment: move it away, or set ARSERVICE_VENV to another directory"
  exit 1
fi

if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  version=$(minor "$python")
  # python3-venv is the package for the distribution's default python3; other versions have their own.
  package=python$version-venv
  [ "$(minor /usr/bin/python3 2>/dev/null || true)" = "$version" ] && package=python3-venv
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "$python lacks venv/ensurepip: apt-get install $package"
    "$(dirname "$0")/apt-install.sh" "$package"
  fi
  if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "$python ($("$python" -V 2>&1)) cannot make a virtual environment: it lacks venv/ensurepip."
    log "On Debian or Ubuntu: sudo apt-get install $package   (or name another Python: PYTHON=/path/to/python3.1x)"
    exit 1
  fi
fi

log "making $dir from $python ($("$python" -V 2>&1))"
"$python" -m venv "$dir"
