#!/usr/bin/env bash
# Make sure a Docker Engine answers here and that the test images exist (no registry needed):
#   local/arservice-busybox:test   busybox-static with every applet, about 2 MB
#   local/arservice-bookworm:test  debootstrap minbase Debian with bash, about 200 MB
# The Debian rootfs is kept in $ARSERVICE_CACHE (default /var/cache/arservice) so the image is
# built once per machine, and the bubblewrap tests use the same directory as a rootfs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "docker-up: $*" >&2; }
cache=${ARSERVICE_CACHE:-/var/cache/arservice}

if ! command -v dockerd >/dev/null || ! command -v busybox >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v curl >/dev/null; then
  log "installing docker.io busybox-static debootstrap curl"
  scripts/apt-install.sh docker.io busybox-static debootstrap curl
fi

# Every `docker info` is bounded: a wedged engine must fail the setup, not hang it.
if ! timeout 30 docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /tmp/dockerd.log)"
  # No bridge and no iptables: containers here run with --network none.
  nohup dockerd --iptables=false --ip-masq=false --bridge=none >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 1 120); do
    timeout 10 docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  timeout 30 docker info >/dev/null 2>&1 || { log "dockerd did not come up; see /tmp/dockerd.log"; tail -20 /tmp/dockerd.log >&2; exit 1; }
fi
log "docker is up ($(timeout 30 docker info --format '{{.ServerVersion}} {{.Driver}}'))"

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

rootfs=$cache/bookworm-rootfs
if [ ! -x "$rootfs/bin/bash" ]; then
  mirror=$(scripts/debian-mirror.sh)  # the machine's own apt mirror (or ARSERVICE_DEBIAN_MIRROR)
  log "debootstrap minbase bookworm into $rootfs from $mirror (about 30 s)"
  rm -rf "$rootfs.partial"
  mkdir -p "$cache"
  debootstrap --variant=minbase bookworm "$rootfs.partial" "$mirror" >/tmp/debootstrap.log 2>&1 \
    || { log "debootstrap failed; see /tmp/debootstrap.log"; tail -20 /tmp/debootstrap.log >&2; exit 1; }
  mv "$rootfs.partial" "$rootfs"
fi
image=local/arservice-bookworm:test
if ! docker image inspect "$image" >/dev/null 2>&1; then
  log "importing $image from $rootfs"
  tar -C "$rootfs" -c . | docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'WORKDIR /root' - "$image" >/dev/null
fi
log "image $image ready"
