"""Environment backends by the name users give in a spec's "type".

A new backend is one file with an Environment subclass plus one line here.
Modules are imported on first use, so a backend's own imports cost nothing until asked for.
"""

import importlib
from typing import TYPE_CHECKING

from ..protocol import ServiceError

if TYPE_CHECKING:
    from .base import Environment

BACKENDS = {
    "local": "arservice.environments.local:LocalEnvironment",
    "docker": "arservice.environments.docker:DockerEnvironment",
    "podman": "arservice.environments.podman:PodmanEnvironment",
    "singularity": "arservice.environments.singularity:SingularityEnvironment",
    "apptainer": "arservice.environments.singularity:ApptainerEnvironment",
    "enroot": "arservice.environments.enroot:EnrootEnvironment",
    "bubblewrap": "arservice.environments.extra.bubblewrap:BubblewrapEnvironment",
}


def backend(type_: object) -> "type[Environment]":
    """The Environment class for a type name; invalid_request if there is none."""
    path = BACKENDS.get(type_) if isinstance(type_, str) else None
    if path is None:
        raise ServiceError("invalid_request", f"unknown environment type {type_!r}; known: {', '.join(sorted(BACKENDS))}")
    module, name = path.split(":")
    cls: type[Environment] = getattr(importlib.import_module(module), name)
    return cls


def available_types() -> list[str]:
    """The backends this host can run."""
    return sorted(name for name in BACKENDS if backend(name).available())
