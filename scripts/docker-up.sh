#!/usr/bin/env bash
# Make sure a Docker Engine answers here, and that the test image exists.
# Installs docker.io and busybox-static when missing (Debian), starts dockerd when it is not
# running, and builds local/arservice-busybox:test from busybox-static (no registry needed).
set -euo pipefail

log() { echo "docker-up: $*" >&2; }

if ! command -v dockerd >/dev/null || ! command -v busybox >/dev/null; then
  log "installing docker.io busybox-static"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io busybox-static >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /tmp/dockerd.log)"
  # No bridge and no iptables: containers here run with --network none.
  nohup dockerd --iptables=false --ip-masq=false --bridge=none >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not come up; see /tmp/dockerd.log"; tail -20 /tmp/dockerd.log >&2; exit 1; }
fi
log "docker is up ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"

image=local/arservice-busybox:test
if ! docker image inspect "$image" >/dev/null 2>&1; then
  log "building $image from busybox-static"
  root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/tmp" "$root/root" "$root/etc"
  cp "$(command -v busybox)" "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
  tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' -c 'WORKDIR /root' - "$image" >/dev/null
  rm -rf "$root"
fi
log "image $image ready"
