#!/usr/bin/env bash
# CI: the package as a user gets it. Build the sdist and the wheel (python -m build), install the
# wheel alone into a fresh venv made from the system Python (SYSTEM_PYTHON, default /usr/bin/python3),
# start `arservice --runner local` from there, run one command over HTTP, join a second agent
# through the job script shipped in the wheel, and stop everything. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "check-wheel: $*" >&2; }
fail() { log "FAILED: $*"; [ -f "${service_log:-}" ] && tail -30 "$service_log" >&2; exit 1; }
dev=${ARSERVICE_VENV:-$PWD/.venv}/bin/python
work=$(mktemp -d /tmp/arservice-wheel-XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# From a copy of the checkout's files (tracked, and new ones git does not ignore): a build writes
# arservice.egg-info into the tree it builds, and this check writes nothing under the checkout.
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || fail "$PWD is not a git checkout: the build copies the files git lists"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/src"
log "python -m build (sdist, then the wheel from the sdist)"
"$dev" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; fail "python -m build"; }
wheel=$(echo "$work"/dist/arservice-*.whl)
sdist=$(echo "$work"/dist/arservice-*.tar.gz)
[ -f "$wheel" ] && [ -f "$sdist" ] || fail "build made no wheel and sdist: $(ls "$work/dist")"
"$dev" - "$wheel" "$sdist" <<'PY' || fail "the wheel or the sdist lacks files"
import sys, tarfile, zipfile
wheel = set(zipfile.ZipFile(sys.argv[1]).namelist())
sdist = {name.split("/", 1)[1] for name in tarfile.open(sys.argv[2]).getnames() if "/" in name}
missing = [n for n in ("arservice/runners/agent.sh", "arservice/py.typed", "arservice/http/app.py", "arservice/http/static/status.js",
                       "arservice/environments/extra/bubblewrap.py") if n not in wheel]
missing += [f"sdist: {n}" for n in ("sbatch/agent.sh", "tests/conftest.py", "scripts/setup.sh", "CHANGELOG.md")
            if n not in sdist]
sys.exit(f"missing: {missing}" if missing else 0)
PY

scripts/venv.sh "$work/venv" "${SYSTEM_PYTHON:-/usr/bin/python3}"
log "pip install $(basename "$wheel") into a fresh venv ($("$work/venv/bin/python" -V))"
PIP_ROOT_USER_ACTION=ignore "$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"

cd "$work"  # away from the checkout: everything below comes from the installed wheel
bin=$work/venv/bin
version=$("$bin/python" -c 'import arservice; print(arservice.__version__)')
[ "$(basename "$wheel")" = "arservice-$version-py3-none-any.whl" ] || fail "__version__ $version does not match $wheel"
read -r http zmq < <("$bin/python" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
service_log=$work/service.log
# With a token, as a site whose agents join by hand runs it (without one, only the runner's own agents may register).
export ARSERVICE_TOKEN
ARSERVICE_TOKEN=$("$bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
"$bin/arservice" --runner local --port "$http" --zmq-port "$zmq" </dev/null >"$service_log" 2>&1 &
service=$!
pids+=("$service")
url=http://127.0.0.1:$http

agents() { curl -fsS "$url/health" 2>/dev/null | "$bin/python" -c 'import json, sys; print(json.load(sys.stdin)["agents"])' 2>/dev/null || echo 0; }
wait_agents() {
  for _ in $(seq 1 300); do
    [ "$(agents)" -ge "$1" ] && return 0
    kill -0 "$service" 2>/dev/null || fail "arservice exited"
    sleep 0.1
  done
  fail "no $1 agent(s) registered within 30 s"
}
call() { curl -fsS -XPOST -H "Authorization: Bearer $ARSERVICE_TOKEN" "$url/$1" -d "$2"; }
field() { "$bin/python" -c "import json, sys; print(json.load(sys.stdin)$1)"; }

wait_agents 1
instance=$(call start_instance '{"environment": {"type": "local"}}' | field '["instance_id"]')
answer=$(call execute_command "{\"instance_id\": \"$instance\", \"command\": \"echo from the wheel; exit 3\"}")
[ "$(field '["output"]' <<<"$answer")" = "from the wheel" ] && [ "$(field '["returncode"]' <<<"$answer")" = 3 ] \
  || fail "execute_command answered $answer"
call close_instance "{\"instance_id\": \"$instance\"}" >/dev/null
log "arservice $version from the wheel ran a command over HTTP"

job_script=$("$bin/python" -c 'from arservice.runners.slurm import SCRIPT; print(SCRIPT)')
case $job_script in "$work/venv/"*) ;; *) fail "the job script $job_script is not in the installed package" ;; esac
ARSERVICE_PYTHON=$bin/python "$job_script" --broker "tcp://127.0.0.1:$zmq" </dev/null >"$work/agent.log" 2>&1 &
agent=$!
pids+=("$agent")
wait_agents 2
kill -TERM "$agent"
wait "$agent" || fail "the job script's agent exited with $? on SIGTERM: $(tail -5 "$work/agent.log")"
log "the job script shipped in the wheel ($job_script) joined an agent"

kill -TERM "$service"
wait "$service" || fail "arservice exited with $? on SIGTERM"
pids=()
log "ok: the wheel installs into $("$bin/python" -V) from ${SYSTEM_PYTHON:-/usr/bin/python3} and runs"
