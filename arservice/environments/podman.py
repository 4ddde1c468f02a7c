"""Podman through its Docker-compatible API: the docker backend, pointed at podman's socket.

The API is `podman system service --time=0 unix:///run/podman/podman.sock` (scripts/podman-up.sh
starts it); CONTAINER_HOST names another address, as it does for podman's own remote client.
Everything else (labels, limits, the fast exec path, reaping) is the docker backend's.
"""

import os

from .docker import DockerEnvironment


class PodmanEnvironment(DockerEnvironment):
    type = "podman"

    # Podman sets HOSTNAME for a container's main process but not for `podman exec`: the helper
    # takes it out, so that its commands see what `podman exec C bash -c` sees.
    helper_prelude = "unset HOSTNAME; "

    @classmethod
    def url(cls) -> str:
        return os.environ.get("CONTAINER_HOST", "unix:///run/podman/podman.sock")
