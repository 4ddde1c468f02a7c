"""Docker containers through the docker SDK, with the fast exec path of helper.py.

Each instance is one container whose main process is the exec helper (it talks to the agent
through FIFOs in a mounted host directory, not through the engine), next to a
`sleep <container_timeout>` that ends it (so a container outlives a crashed agent by
at most that). `fast_exec: false` runs `sleep <container_timeout>` alone and each command
through its own exec session. Docker's init reaps the orphans of killed commands (zombies would
count against pids_limit). Containers are labelled arservice=1 with their instance, agent, host
and agent pid, so an agent can reap the containers of dead agents of its host.
"""

import io
import math
import os
import socket
import tarfile
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field

from ..logs import EventLog
from ..protocol import ServiceError
from ..schemas import Text, finite_everywhere
from . import hostdir
from .base import Amount, Shell, Spec, Words, check_command, resolve_path, shell_argv
from .helper import MOUNT, ExecHelper, HelperEnvironment, backstop, helper_argv, plain_exec_argv, plain_result
from .process import BoundedOutput

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = EventLog("docker")

LABEL = "arservice"
PULL_PROGRESS_EVERY_S = 5.0
# How long a close keeps trying to remove a container while the engine fails (dockerd restarting), and how often.
ENGINE_WAIT_S = 20.0
ENGINE_RETRY_S = 0.5
_clients: dict[str, "docker.DockerClient"] = {}  # engine URL -> DockerClient, shared by every instance's thread (requests pools connections)


# Go's os.FileMode type bits, as the engine reports a path's mode: directory, symlink, named pipe,
# socket, device, character device, irregular. None of them set: a regular file.
GO_MODE_TYPE = (1 << 31) | (1 << 27) | (1 << 25) | (1 << 24) | (1 << 26) | (1 << 21) | (1 << 19)


class ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (the engine's archive stream), read on demand."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(chunks)
        self.pending: bytes | None = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # a writable buffer (memoryview)
        while not self.pending:
            self.pending = next(self.chunks, None)
            if self.pending is None:
                self.pending = b""
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


OWNER_LABELS = (f"{LABEL}.agent", f"{LABEL}.host", f"{LABEL}.pid")


def _owner(labels: dict) -> tuple[str, int] | None:
    """(host, pid) of the process that owns a labelled container, from its labels (the agent id
    names both, where the host or pid label is missing); None if they name none."""
    from ..agent.workdirs import agent_owner  # the agent id's format is the agent's
    host, pid = labels.get(f"{LABEL}.host"), labels.get(f"{LABEL}.pid", "")
    named = agent_owner(labels.get(f"{LABEL}.agent", ""))
    if named is not None:
        host, pid = host or named[0], pid or str(named[1])
    return (host, int(pid)) if host and pid.isdigit() else None


class DockerSpec(Spec):
    image: Text = Field(description="An image the engine has (pull: never), or may pull.")
    pull: Literal["never", "missing", "always"] = "missing"
    pull_timeout: Amount = 600.0
    forward_env: Words = Field(default_factory=list, description="The agent's variables of these names, passed on.")
    container_timeout: Amount = Field(24 * 3600.0, description="Seconds (rounded up to whole ones) after which the container ends itself, "
                                                               "whatever happens to the agent.")
    run_options: Annotated[dict[str, Any], AfterValidator(finite_everywhere)] = Field(
        default_factory=dict, description="More keyword arguments of the SDK's containers.create.")
    shell: Shell | None = Field(None, description="Default: bash where the image has it, else sh.")
    fast_exec: bool = Field(True, description="Commands through the exec helper (a fork each); false: an exec session each.")


class DockerEnvironment(HelperEnvironment):
    type = "docker"
    can_fork = True
    starts_in_threads = True  # the engine starts the container: it waits on the engine, nothing else
    enforces = {"cpus", "memory", "pids", "network", "disk"}
    spec_model = DockerSpec
    helper_prelude = ""  # shell code the helper runs first, to make its environment what an exec's would be
    create_sent = False  # the engine may hold a container of this instance, made or being made
    container: "Container" = None  # type: ignore[assignment]  # start() creates it, before any use but close()'s
    host_dir: str | None = None
    fork_image: str | None = None  # the image committed from the instance this one is a fork of

    @classmethod
    def url(cls) -> str:
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")

    @classmethod
    def available(cls) -> bool:
        url = cls.url()
        return not url.startswith("unix://") or os.path.exists(url[len("unix://"):])

    @classmethod
    def client(cls) -> "docker.DockerClient":
        """One client per engine and agent: asking the engine its API version costs a round trip."""
        url = cls.url()
        if url not in _clients:
            import docker
            _clients[url] = docker.DockerClient(base_url=url, timeout=120, max_pool_size=64)
        return _clients[url]

    @classmethod
    def reap(cls, host: str, alive: Callable[[int], bool]) -> list[str]:
        """Remove the labelled containers that provably have no live owner on this host; return their ids.

        The owner is the pid in the labels (or in the agent id, which names it, where the pid label is
        missing). A container with no owner label at all (made by hand, or by something that did not
        label it) is removed once nothing runs in it: a running one may be in a live process's hands."""
        reaped = []
        # The low-level list carries the labels: no inspect per container (other agents' included).
        for container in cls.client().api.containers(all=True, filters={"label": f"{LABEL}=1"}):
            labels = container.get("Labels") or {}
            owner = _owner(labels)
            if owner is None:
                if any(name in labels for name in OWNER_LABELS) or container.get("State") not in ("exited", "dead"):
                    continue  # an owner label it cannot read, or something runs in it
            elif owner[0] != host or alive(owner[1]):
                continue
            try:
                cls.client().api.remove_container(container["Id"], force=True)
            except Exception as exc:  # noqa: BLE001 (gone meanwhile, or removed by another reaper)
                log.debug("reap_skipped", container=container["Id"][:12], error=str(exc))
                continue
            reaped.append(container["Id"])
        return reaped + cls._reap_commits(host, alive)

    @classmethod
    def _reap_commits(cls, host, alive):
        """Images committed for forks and snapshots by dead agents of this host (their containers
        went first, above)."""
        import docker.errors
        reaped = []
        for image in cls.client().images.list(filters={"label": f"{LABEL}.commit_of"}):
            owner = _owner(image.labels)
            if owner is None or owner[0] != host or alive(owner[1]):
                continue
            try:
                cls.client().images.remove(image.id)
                reaped.append(image.id)
            except docker.errors.APIError as exc:
                log.warning("commit_kept", image=image.id, reason=str(exc))
        return reaped

    def start(self) -> dict[str, Any]:
        if self.seed is not None:
            self.config = {**self.config, "image": self.seed["image"], "pull": "never"}
            self.fork_image = self.seed["image"] if self.seed["for_forks"] else None
        config = self.config
        self.docker = self.client()
        self._ensure_image()
        self.host_dir = hostdir.make(self.workdir_root, f"{self.instance_id}-", hostdir.helper_dir_mib(config))
        env = {name: os.environ[name] for name in config["forward_env"] if name in os.environ}
        env.update(config["env"])
        network = config["network"]
        lifetime = math.ceil(config["container_timeout"])  # the backstop counts whole seconds
        fast = config["fast_exec"]
        options: dict[str, Any] = dict(
            # The helper is the main process, PID 1, which no command can signal: no exec session
            # to pay for, and it reaps orphans itself. It ends when the agent dies (its FIFO
            # closes), and so does the container; the backstop ends it after container_timeout
            # whatever happens. Without it, Docker's init reaps the orphans.
            entrypoint=helper_argv(self.helper_prelude + backstop(lifetime)) if fast else ["sleep", str(lifetime)],
            init=not fast, environment=env,
            labels={LABEL: "1", f"{LABEL}.instance": self.instance_id, f"{LABEL}.agent": self.agent_id,
                    f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": str(os.getpid())},
            network_mode="none" if network in (None, False) else ("bridge" if network is True else network),
            volumes={self.host_dir: {"bind": MOUNT, "mode": "rw"}},
        )
        # The main process's stdout is the engine's log, kept on the host's disk without bound and never
        # read by the service: an instance wrote 120 MB there from 20 MB to /proc/1/fd/1.
        options["log_config"] = {"type": "none"}
        if config["cwd"]:
            options["working_dir"] = config["cwd"]
        if config["cpus"]:
            options["nano_cpus"] = int(config["cpus"] * 1e9)
        if config["memory"]:
            options["mem_limit"] = f"{config['memory']}m"
            options["memswap_limit"] = f"{config['memory']}m"
        if config["pids"]:
            options["pids_limit"] = config["pids"]
        if config["disk"]:  # the writable layer; only some storage drivers can (overlay2 on xfs with pquota)
            options["storage_opt"] = {"size": f"{config['disk']}m"}
        options.update(config["run_options"])
        if fast:
            self.helper = ExecHelper(self.host_dir, pid_one=True)
        try:
            self.create_sent = True
            self.container = self.docker.containers.create(config["image"], **options)
            # Counted from before the start: the backstop's sleep begins during it, and a container
            # that it ended must never look young enough to revive (under load a start takes seconds).
            starting = time.monotonic()
            self.container.start()
            self.ends_at = starting + lifetime
        except Exception as exc:
            if config["disk"] and "storage-opt" in str(exc).lower():
                raise ServiceError("invalid_request", f"{self.type} on this agent cannot enforce disk: {exc}") from exc
            raise ServiceError("environment_error", f"{self.type} could not start {config['image']}: {exc}") from exc
        self.workdir = self.container.attrs["Config"].get("WorkingDir") or "/"
        if fast:
            self.helper.wait_ready(self._running)  # type: ignore[union-attr]  # made above when fast
        self.shell = config["shell"] or (self.helper.best_shell if self.helper else self._pick_shell())
        return {"container_id": self.container.id, "shell": self.shell, "fast_exec": self.helper is not None}

    def _ensure_image(self):
        import docker.errors
        image, policy = self.config["image"], self.config["pull"]
        if policy != "always":
            try:
                self.docker.images.get(image)
                return
            except docker.errors.ImageNotFound as err:
                if policy == "never":
                    raise ServiceError("environment_error", f"image {image} is not present and pull is 'never'") from err
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
        deadline = time.monotonic() + self.config["pull_timeout"]
        shown = 0.0
        log.info("image_pull_started", image=image)
        try:
            for event in self.docker.api.pull(repository, tag=tag, stream=True, decode=True):
                now = time.monotonic()
                if now > deadline:
                    raise ServiceError("timeout", f"pulling {image} took longer than {self.config['pull_timeout']}s")
                if "error" in event:
                    raise ServiceError("environment_error", f"pulling {image} failed: {event['error']}")
                if now - shown >= PULL_PROGRESS_EVERY_S:
                    log.info("image_pull_progress", image=image, status=event.get("status"), progress=event.get("progress", ""))
                    shown = now
        except docker.errors.APIError as exc:
            raise ServiceError("environment_error", f"pulling {image} failed: {exc.explanation or exc}") from exc
        log.info("image_pull_done", image=image)

    def _pick_shell(self):
        result = self.container.exec_run(["sh", "-c", "command -v bash || command -v sh"])
        found = result.output.decode(errors="replace").strip().splitlines()
        if result.exit_code != 0 or not found:
            raise ServiceError("environment_error", f"image {self.config['image']} has no POSIX shell")
        return os.path.basename(found[0])  # by name, as `docker exec C bash -c` starts it: $0 is the same

    def _running(self):
        self.container.reload()
        return self.container.status == "running"

    def command_context(self, cwd: str | None, env: dict[str, str] | None) -> tuple[str | None, dict[str, str]]:
        # The spec's env is the container's own (create's environment): a command gets only its own.
        return resolve_path(cwd, self.config["cwd"] or self.workdir) if cwd else None, env or {}

    def execute_without_helper(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                               output_limit: int) -> dict[str, Any]:
        """fast_exec false: one exec session per command, output streamed into a bounded buffer."""
        started = time.monotonic()
        api = self.docker.api
        cwd, variables = self.command_context(cwd, env)
        check_command(command, variables)
        argv = shell_argv(self.shell, command)
        if variables:  # through env, after the wrapper: its sh would read them (dash resets IFS and PPID)
            argv = ["env", *(f"{name}={value}" for name, value in variables.items()), *argv]
        exec_id = api.exec_create(self.container.id, plain_exec_argv(argv, timeout), workdir=cwd)["Id"]
        output = BoundedOutput(output_limit)
        for chunk in api.exec_start(exec_id, stream=True):
            output.feed(chunk)
        data, truncated = output.value()
        return plain_result({"output": data, "returncode": api.exec_inspect(exec_id)["ExitCode"], "timed_out": False,
                             "truncated": truncated, "duration_s": round(time.monotonic() - started, 6)}, timeout)

    def restart_helper(self) -> None:
        """The helper was the container's main process: the container starts again (its filesystem
        kept) with a new one, unless it ended as container_timeout asked."""
        if time.monotonic() >= self.ends_at:  # the backstop ended it, as container_timeout asks: no revival
            raise ServiceError("instance_lost", f"the container ended: its container_timeout of "
                                f"{self.config['container_timeout']:g}s has passed")
        try:
            self.container.restart(timeout=0)  # its filesystem is kept
        except Exception as exc:
            raise ServiceError("instance_lost", f"{self.type} could not restart the instance after its helper died: {exc}") from exc
        self.helper.wait_ready(self._running)  # type: ignore[union-attr]  # revived: it has one

    def write_file(self, path: str, content: bytes, mode: int) -> dict[str, Any]:
        path = resolve_path(path, self.config["cwd"] or self.workdir)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(os.path.basename(path))
            info.size, info.mode, info.mtime = len(content), mode, int(time.time())
            tar.addfile(info, io.BytesIO(content))
        parent = os.path.dirname(path)
        self.container.exec_run(["mkdir", "-p", parent])
        if not self.container.put_archive(parent, archive.getvalue()):
            raise ServiceError("environment_error", f"could not write {path}")
        return {"path": path, "written": len(content)}

    def read_file(self, path: str, limit: int) -> dict[str, Any]:
        import docker.errors
        path = resolve_path(path, self.config["cwd"] or self.workdir)
        try:
            stream, stat = self.container.get_archive(path)
        except docker.errors.NotFound as err:
            raise ServiceError("not_found", f"no such file: {path}") from err
        try:
            return {"content": self._first_file(path, stream, stat, limit)}
        finally:
            stream.close()  # type: ignore[attr-defined]  # a generator: the rest of the archive is never fetched

    @staticmethod
    def _first_file(path, stream, stat, limit):
        # Before fetching anything: a directory's archive is everything under it, whatever "size" says.
        if stat["mode"] & GO_MODE_TYPE:
            raise ServiceError("invalid_request", f"{path} is not a regular file")
        if stat["size"] > limit:
            raise ServiceError("payload_too_large", f"{path} is larger than the read limit of {limit} bytes")
        # Streamed, one member only: the file may have grown since the stat (it is the instance's).
        with tarfile.open(fileobj=ChunkReader(stream), mode="r|") as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise ServiceError("invalid_request", f"{path} is not a regular file")
            if member.size > limit:
                raise ServiceError("payload_too_large", f"{path} is larger than the read limit of {limit} bytes")
            return tar.extractfile(member).read()

    def snapshot(self, directory: str | None = None) -> dict[str, Any]:
        """An image committed from the container (paused meanwhile): its files as they are now, not
        its processes, nor what is in its mounts. A fork's image (no `directory`: nothing outlives
        the forks) goes with the last container made from it; a named snapshot's with drop_snapshot."""
        labels = {LABEL: "1", f"{LABEL}.commit_of": self.instance_id, f"{LABEL}.agent": self.agent_id,
                  f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": str(os.getpid())}
        try:
            image = self.container.commit(conf={"Labels": labels})
        except Exception as exc:
            raise ServiceError("environment_error", f"could not commit the container of {self.instance_id}: {exc}") from exc
        return {"image": image.id, "for_forks": directory is None}

    @classmethod
    def drop_snapshot(cls, handle: dict[str, Any]) -> None:
        cls._remove_image(cls.client(), handle["image"])

    def close(self) -> None:
        try:
            if self.create_sent:
                self._remove_container()
        finally:
            self.close_helper()
            if self.host_dir:
                hostdir.remove(self.host_dir)
            if self.fork_image is not None:
                self._remove_image(self.docker, self.fork_image)

    @staticmethod
    def _remove_image(client, image_id):
        import docker.errors
        try:
            client.images.remove(image_id)
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: containers still use it; the last fork's close removes it
                raise

    def _remove_container(self) -> None:
        """Remove the container, trying again for up to ENGINE_WAIT_S while the engine fails (a
        dockerd shutting down refuses, then takes no connection): the agent forgets a closed
        instance, so a removal that gave up at once left the container behind for good."""
        deadline = time.monotonic() + ENGINE_WAIT_S
        while True:
            try:
                # Without a container, the create may have failed after the engine made one (its
                # answer lost as dockerd stopped): the instance's label finds it.
                for container_id in ([self.container.id] if self.container is not None else [
                        c["Id"] for c in self.docker.api.containers(
                            all=True, filters={"label": f"{LABEL}.instance={self.instance_id}"})]):
                    self.docker.api.remove_container(container_id, force=True)  # type: ignore[arg-type]  # made: it has an id
                return
            except Exception as exc:  # the SDK's and requests' errors: only "No such container" means done
                if "No such container" in str(exc):
                    return
                if time.monotonic() >= deadline:
                    raise
                log.warning("remove_retried", instance=self.instance_id, error=str(exc)[:200])
                time.sleep(ENGINE_RETRY_S)

