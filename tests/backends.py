"""The environment specs the backend tests run against, and why one may be missing here.

scripts/setup.sh installs and starts everything listed (dockerd, podman's API, the test images,
a debootstrap rootfs), so on a machine it has set up nothing here is skipped.
"""

import os
import shutil

import pytest

from arservice.environments import backend

CACHE = os.environ.get("ARSERVICE_CACHE", "/var/cache/arservice")
ROOTFS = os.path.join(CACHE, "bookworm-rootfs")
BUSYBOX = "local/arservice-busybox:test"
BOOKWORM = "local/arservice-bookworm:test"

SPECS = {
    "local": {"type": "local"},
    "local-fast": {"type": "local", "fast_exec": True},
    "docker-busybox": {"type": "docker", "image": BUSYBOX, "pull": "never"},
    "docker-bookworm": {"type": "docker", "image": BOOKWORM, "pull": "never"},
    "docker-plain-exec": {"type": "docker", "image": BUSYBOX, "pull": "never", "fast_exec": False},
    "docker-bookworm-plain-exec": {"type": "docker", "image": BOOKWORM, "pull": "never", "fast_exec": False},
    "podman": {"type": "podman", "image": BUSYBOX, "pull": "never"},
    "podman-bookworm": {"type": "podman", "image": BOOKWORM, "pull": "never"},
    "bubblewrap": {"type": "bubblewrap"},
    "bubblewrap-rootfs": {"type": "bubblewrap", "root": ROOTFS},
    "bubblewrap-rootfs-sh": {"type": "bubblewrap", "root": ROOTFS, "shell": "sh"},
    "bubblewrap-per-command": {"type": "bubblewrap", "fast_exec": False},
}


def _docker_images(kind):
    import docker
    client = docker.DockerClient(base_url=backend(kind).url(), timeout=10)
    try:
        return {tag for image in client.images.list() for tag in image.tags}
    finally:
        client.close()


def missing(name):
    """Why the spec `name` cannot run on this machine, or None if it can."""
    spec = SPECS[name]
    kind = spec["type"]
    if not backend(kind).available():
        return f"{kind} is not installed or not running here (scripts/setup.sh installs and starts it)"
    if "image" in spec:
        try:
            images = _docker_images(kind)
        except Exception as exc:
            return f"{kind} API does not answer at {backend(kind).url()}: {exc}"
        if not any(tag.endswith(spec["image"]) for tag in images):
            return f"image {spec['image']} is not built (scripts/docker-up.sh and scripts/podman-up.sh build it)"
    if spec.get("root") and not os.path.isdir(spec["root"]):
        return f"rootfs {spec['root']} is not built (scripts/docker-up.sh debootstraps it)"
    if kind == "bubblewrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed"
    return None


def params(*names):
    """pytest params for specs, each marked skip with its reason where it cannot run here."""
    return [pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if (why := missing(name)) else [])
            for name in names]
