#!/usr/bin/env bash
# Make sure podman's Docker-compatible API answers on unix:///run/podman/podman.sock and holds
# the busybox and Debian test images (copied from Docker, so run scripts/docker-up.sh first).
#
# Why the containers.conf: as root, podman asks the OCI runtime for nofile and nproc limits of
# 1048576, above this machine's hard limits, and runc/crun may not raise them ("error setting
# rlimit type 6/7: operation not permitted"); crun also refuses cgroup v1+v2 hybrid hosts. So the
# service runs with runc and default ulimits no higher than what its own process may set: the
# largest candidate that a real `podman run` accepts wins.
set -euo pipefail

log() { echo "podman-up: $*" >&2; }
sock=/run/podman/podman.sock
conf=${ARSERVICE_CACHE:-/var/cache/arservice}/podman-containers.conf

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || [ ! -x /usr/libexec/podman/catatonit ]; then
  log "installing podman runc catatonit"
  "$(dirname "$0")/apt-install.sh" podman runc catatonit
fi

for image in local/arservice-busybox:test local/arservice-bookworm:test; do  # bookworm: the fidelity tests' bash
  if ! podman image exists "$image"; then
    log "copying $image from docker"
    docker save "$image" | podman load >/dev/null
  fi
done
image=local/arservice-busybox:test

if ! [ -S "$sock" ] || ! curl -sf -m 10 --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; then
  mkdir -p "$(dirname "$conf")" "$(dirname "$sock")"
  nofile=$(ulimit -Hn)
  found=
  for nproc in $(ulimit -Hu) 32768 4096; do
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n[engine]\nruntime = "runc"\n' \
      "$nofile" "$nofile" "$nproc" "$nproc" > "$conf"
    if CONTAINERS_CONF=$conf timeout 60 podman run --rm --network none "$image" true >/dev/null 2>&1; then
      found=$nproc; break
    fi
  done
  [ -n "$found" ] || { log "podman run fails with every ulimit tried:"; CONTAINERS_CONF=$conf podman run --rm --network none "$image" true; exit 1; }
  log "podman runs containers with runc, nofile=$nofile nproc=$found ($conf)"
  rm -f "$sock"
  # From /, not from here: its conmon (before 2.1.13) creates an empty file `oom` in its working
  # directory each time a container is OOM-killed (containers/conmon#504), which was the checkout.
  (cd / && CONTAINERS_CONF=$conf exec nohup podman system service --time=0 "unix://$sock" >/tmp/podman-service.log 2>&1) &
  for _ in $(seq 1 60); do
    curl -sf -m 10 --unix-socket "$sock" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -sf -m 10 --unix-socket "$sock" http://d/_ping >/dev/null || { log "podman API did not come up; see /tmp/podman-service.log"; exit 1; }
fi
log "podman API is up at unix://$sock"
