"""mini-swe-agent on arservice: switch by changing one line of a mini-swe-agent yaml config.

    environment:
      environment_class: arservice.integrations.minisweagent.ArserviceEnvironment
      image: python:3.11          # the keys of mini-swe-agent's DockerEnvironment, same defaults
      cwd: /testbed
      address: tcp://127.0.0.1:5555   # the service (http://... works too); ARSERVICE_ADDRESS
      # token: ...                    # or ARSERVICE_TOKEN
      # spec: {pull: never, memory: 2g}   # more arservice spec fields; type docker and network true
      #                                   # (as mini-swe-agent's containers) unless given
      # preset: swe                   # or a preset of the service, instead of a spec

`ArserviceEnvironment` answers as mini-swe-agent's own environments do: the same `execute` result
(output, returncode, exception_info; a timeout is returncode -1 with a TimeoutExpired in
exception_info and the partial output), the same submit check, `get_template_vars` and
`serialize` (the token is never serialized). mini-swe-agent's SWE-bench runners set `image` only
for their own environment classes: run them through `python -m arservice.integrations.minisweagent
swebench ...` (same options), which passes each task's image to this class as well.
"""

import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

from minisweagent.environments.docker import DockerEnvironment
from pydantic import BaseModel, ConfigDict, Field

from ..client import HTTPClient, ServiceError, ZMQClient
from ..schemas import MAX_OUTPUT_LIMIT

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
CLASS_PATH = "arservice.integrations.minisweagent.ArserviceEnvironment"
START_RETRY_S = (0.1, 2.0)  # first and largest pause between starts refused with no_capacity


class ArserviceEnvironmentConfig(BaseModel):
    # A misspelt key (`adress:`) is an error, not a silent default, as everywhere in arservice.
    model_config = ConfigDict(extra="forbid")

    # mini-swe-agent's DockerEnvironmentConfig keys, with its defaults.
    image: str | None = None
    """The image; may stay unset where the spec needs none (local, bubblewrap)."""
    cwd: str = "/"
    """Working directory of every command; empty: the instance's own (the spec's cwd, or the backend's),
    which is the default for local and bubblewrap specs, as in mini's Local and Bubblewrap environments."""
    env: dict[str, str] = {}
    forward_env: list[str] = []
    """Variables copied from this process's environment (where mini-swe-agent runs) into the instance's."""
    timeout: int = 30
    executable: str = os.getenv("MSWEA_DOCKER_EXECUTABLE", "docker")
    """Accepted for DockerEnvironment configs; `podman` picks the podman backend when no spec is given."""
    run_args: list[str] = ["--rm"]
    """Accepted as DockerEnvironment's default only: docker run arguments go in spec.run_options."""
    container_timeout: str = "2h"
    pull_timeout: int = 120
    interpreter: list[str] = ["bash", "-lc"]
    """The argv the command is appended to (the spec's `shell`)."""
    # arservice's own keys.
    address: str = Field(default_factory=lambda: os.getenv("ARSERVICE_ADDRESS", DEFAULT_ADDRESS))
    """The service: tcp://HOST:PORT (ZeroMQ, lowest latency) or http://HOST:PORT."""
    token: str | None = Field(default=None, exclude=True)
    """Bearer token (default ARSERVICE_TOKEN); never serialized into trajectories."""
    spec: dict[str, Any] = {}
    """arservice spec fields for the instance; type defaults to docker (podman with executable podman).
    network defaults to true (the engine's default network), as mini-swe-agent's containers have it."""
    preset: str | None = None
    """A preset of the service instead of a spec; image, interpreter and the container keys then come from it."""
    start_wait: float = 600.0
    """Seconds to keep retrying a start the service refuses with no_capacity."""


_clients: dict[tuple[str, str | None], ZMQClient | HTTPClient] = {}
_clients_lock = threading.Lock()


def client_for(address: str, token: str | None) -> ZMQClient | HTTPClient:
    """One client per service and process: both clients are safe to share between threads."""
    with _clients_lock:
        key = (address, token)
        if key not in _clients:
            cls = HTTPClient if address.startswith(("http://", "https://")) else ZMQClient
            _clients[key] = cls(address, token=token)
        return _clients[key]


def sleep_seconds(duration: str) -> float:
    """`sleep`'s duration syntax (mini-swe-agent's container_timeout): 90, 1.5m, 2h, 1d."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", str(duration))
    if not match:
        raise ValueError(f"container_timeout must be like 90, 30m, 2h or 1d, not {duration!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class ArserviceEnvironment:
    def __init__(self, *, config_class: type = ArserviceEnvironmentConfig, **kwargs: Any) -> None:
        """Start one arservice instance; see `ArserviceEnvironmentConfig` for the keyword arguments."""
        self.instance_id: str | None = None
        self.config = config_class(**kwargs)
        if self.config.run_args != ["--rm"]:
            raise ValueError(f"run_args {self.config.run_args} are docker CLI arguments: put run options in "
                             "spec.run_options (keyword arguments of the docker SDK's containers.run)")
        self.client = client_for(self.config.address, self.config.token)
        self._command_env: dict[str, str] | None = None  # with a preset, env and forward_env travel with each command
        self.instance_id = self._start(self._environment())["instance_id"]

    def _forwarded_env(self) -> dict[str, str]:
        # As DockerEnvironment: set variables only, and `env` wins over forwarded ones.
        forwarded = {key: value for key in self.config.forward_env if (value := os.getenv(key)) is not None}
        return {**forwarded, **self.config.env}

    def _environment(self) -> str | dict:
        config = self.config
        if config.preset is not None:
            given = sorted({"image", "interpreter", "container_timeout", "pull_timeout", "spec"} & config.model_fields_set)
            if given:
                raise ValueError(f"preset {config.preset!r} already says what {', '.join(given)} would: give one or the other")
            self._command_env = self._forwarded_env() or None
            return config.preset
        spec = dict(config.spec)
        spec.setdefault("type", "podman" if os.path.basename(config.executable) == "podman" else "docker")
        if spec["type"] in ("local", "bubblewrap") and "cwd" not in config.model_fields_set:
            # DockerEnvironment's `/` is an image's root; mini's Local and Bubblewrap environments
            # default to a directory of their own, as these instances do.
            config.cwd = ""
        if config.image is not None:
            spec["image"] = config.image
        if config.cwd:
            spec["cwd"] = config.cwd
        spec["shell"] = list(config.interpreter)
        # mini-swe-agent keeps a command's whole output; the service keeps at most this much.
        spec.setdefault("output_limit", MAX_OUTPUT_LIMIT)
        spec["env"] = {**spec.get("env", {}), **self._forwarded_env()}
        if spec["type"] in ("docker", "podman"):
            spec.setdefault("container_timeout", sleep_seconds(config.container_timeout))
            spec.setdefault("pull_timeout", config.pull_timeout)
        if spec["type"] in ("docker", "podman", "bubblewrap"):
            # mini-swe-agent's containers and sandboxes have the network (pip install works in
            # them); arservice isolates by default. A switch must not change what commands see.
            spec.setdefault("network", True)
        return spec

    def _start(self, environment: str | dict) -> dict:
        """start_instance, retried while the service has no room, for up to start_wait seconds."""
        deadline = time.monotonic() + self.config.start_wait
        pause = START_RETRY_S[0]
        while True:
            try:
                return self.client.start_instance(environment)
            except ServiceError as exc:
                if exc.code != "no_capacity" or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, START_RETRY_S[1])

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        """Execute a command in the instance and return the result as a dict (as DockerEnvironment does)."""
        command = action.get("command", "")
        cwd = cwd or self.config.cwd
        timeout = timeout or self.config.timeout
        assert self.instance_id, "Instance not started"
        try:
            result = self.client.execute(self.instance_id, command, timeout=timeout, cwd=cwd or None,
                                         env=self._command_env)
            if result["timed_out"]:
                # What mini-swe-agent's environments get from subprocess on a timeout.
                raise subprocess.TimeoutExpired(command, timeout, output=result["output"])
            output = {"output": result["output"], "returncode": result["returncode"], "exception_info": ""}
        except Exception as e:  # noqa: BLE001 - as mini-swe-agent's environments: every failure is an observation
            raw_output = getattr(e, "output", None)
            raw_output = (
                raw_output.decode("utf-8", errors="replace") if isinstance(raw_output, bytes) else (raw_output or "")
            )
            output = {
                "output": raw_output,
                "returncode": -1,
                "exception_info": f"An error occurred while executing the command: {e}",
                "extra": {"exception_type": type(e).__name__, "exception": str(e)},
            }
        self._check_finished(output)
        return output

    # mini-swe-agent's own code, not a copy: they read only `self.config` and the class name.
    _check_finished = DockerEnvironment._check_finished
    get_template_vars = DockerEnvironment.get_template_vars
    serialize = DockerEnvironment.serialize

    def cleanup(self) -> None:
        """Close the instance (the service removes its container, processes and files)."""
        instance_id, self.instance_id = getattr(self, "instance_id", None), None
        if instance_id is not None:
            try:
                self.client.close_instance(instance_id)
            except ServiceError as exc:
                if exc.code != "not_found":
                    raise

    def __del__(self) -> None:
        try:
            self.cleanup()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit the client may be gone already;
            pass  # a container then ends after container_timeout, as mini-swe-agent's own do


def run_swebench(runner: str, argv: list[str]) -> None:
    """Run mini-swe-agent's SWE-bench runner `swebench` (batch) or `swebench-single` with argv,
    giving each task's image to ArserviceEnvironment as the runner gives it to DockerEnvironment."""
    from minisweagent.run.benchmarks import swebench, swebench_single

    original = swebench.get_sb_environment

    def get_sb_environment(config: dict, instance: dict):
        env_config = config.get("environment", {})
        if env_config.get("environment_class") == CLASS_PATH:
            image = swebench.get_swebench_docker_image_name(instance)
            config = {**config, "environment": {**env_config, "image": image}}
        return original(config, instance)

    swebench.get_sb_environment = swebench_single.get_sb_environment = get_sb_environment
    app = {"swebench": swebench.app, "swebench-single": swebench_single.app}[runner]
    app(argv, prog_name=f"python -m arservice.integrations.minisweagent {runner}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("swebench", "swebench-single"):
        sys.exit("usage: python -m arservice.integrations.minisweagent {swebench,swebench-single} "
                 "[mini-swe-agent's options for that runner]")
    run_swebench(argv[0], argv[1:])


if __name__ == "__main__":
    main()
