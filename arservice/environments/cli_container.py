"""What apptainer/singularity and enroot share: containers driven by a command-line tool.

A subclass says how to turn the user's image into a local file (`build_argv`), and which
command lines start, enter, stop and list its containers; this class does the rest: a cache of
converted images keyed by image name, built once under a lock with a timeout and retries; a
per-instance host directory mounted at helper.MOUNT; the fast exec path through one long-lived
`sh` inside the container; a plain-exec fallback; files copied through the mounted directory.

Containers are named ars-<agent pid>-<host>-<instance id>, so the next agent on the same host
can find and remove what a crashed one left behind.
"""

import fcntl
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from ..logs import EventLog
from ..protocol import ServiceError
from ..schemas import Text
from . import hostdir, process, safefs
from .base import Amount, Shell, Spec, SpecModel, resolve_path, shell_argv
from .helper import MOUNT, ExecHelper, HelperEnvironment, helper_argv, plain_exec_argv, plain_result, script_for

log = EventLog("cli_container")

IMAGE_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
TOOL_TIMEOUT_S = 120.0


def short_host() -> str:
    return socket.gethostname().split(".")[0]


def run_tool(argv: list[str], timeout: float = TOOL_TIMEOUT_S, what: str | None = None) -> str:
    """Run one tool command to completion; environment_error naming it if it fails."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ServiceError("timeout", f"{what or argv[0]} took longer than {timeout:.0f}s") from err
    except OSError as exc:
        raise ServiceError("environment_error", f"{what or argv[0]} could not run: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise ServiceError("environment_error", f"{what or argv[0]} failed ({done.returncode}): {detail}")
    return done.stdout.decode(errors="replace")


class CLIContainerSpec(Spec):
    image: Text = Field(description="An image reference the tool can convert (docker://..., a .sif, a .sqsh), or a path.")
    executable: Text | None = Field(None, description="The tool (default: the first of the backend's found on PATH).")
    cache_dir: Text | None = Field(None, description="Where converted images are kept.")
    build_timeout: Amount = 1800.0
    build_retries: int = Field(2, ge=0, le=100)
    shell: Shell | None = Field(None, description="Default: bash where the image has it, else sh.")
    fast_exec: bool = Field(True, description="Commands through the exec helper; false: an exec each.")


class CLIContainerEnvironment(HelperEnvironment):
    image_suffix: str = None  # type: ignore[assignment]  # each backend sets it; file name suffix of a converted image in the cache (".sif", ".sqsh")
    spec_model: ClassVar[SpecModel] = CLIContainerSpec
    executables: tuple[str, ...] = ()  # tool names to look for, preferred first
    host_dir: str = None  # type: ignore[assignment]  # made by start(), before any use but close()'s
    name: str = None  # type: ignore[assignment]  # start() names the container; None again once closed
    tool: str  # the tool's path, found by start()

    # --- what a subclass provides -------------------------------------------------------
    def build_argv(self, image: str, dest: str) -> list[str]:
        """Command that converts `image` (a URI) into the local file dest."""
        raise NotImplementedError

    def start_argv(self, image_path: str) -> list[list[str]]:
        """Commands (a list of argvs) that bring the container self.name up."""
        raise NotImplementedError

    def enter_argv(self, argv: list[str]) -> list[str]:
        """Command that runs argv inside the running container."""
        raise NotImplementedError

    def stop_argv(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def list_names(cls, tool: str) -> list[str]:
        """Names of the containers that exist on this host."""
        raise NotImplementedError

    @classmethod
    def remove_argv(cls, tool: str, name: str) -> list[str]:
        raise NotImplementedError

    # --- the shared part ----------------------------------------------------------------
    @classmethod
    def find_tool(cls, preferred: str | None = None) -> str | None:
        for name in ([preferred] if preferred else cls.executables):
            path = shutil.which(name)
            if path:
                return path
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.find_tool() is not None

    @classmethod
    def reap(cls, host: str, alive: Callable[[int], bool]) -> list[str]:
        tool = cls.find_tool()
        if tool is None:
            return []
        reaped = []
        for name in cls.list_names(tool):
            match = re.fullmatch(r"ars-(\d+)-(.+)-(i-[0-9a-f]+)", name)
            if match and match.group(2) == short_host() and not alive(int(match.group(1))):
                run_tool(cls.remove_argv(tool, name), what=f"removing {name}")
                reaped.append(name)
        return reaped

    def start(self) -> dict[str, Any]:
        self.tool = self.find_tool(self.config["executable"])  # type: ignore[assignment]  # None is refused below
        if self.tool is None:
            wanted = self.config["executable"] or " or ".join(self.executables)
            raise ServiceError("environment_error", f"{wanted} is not installed on this agent")
        self.name = f"ars-{os.getpid()}-{short_host()}-{self.instance_id}"
        self.host_dir = hostdir.make(self.workdir_root, f"{self.instance_id}-", hostdir.helper_dir_mib(self.config))
        image_path = self.local_image()
        for argv in self.start_argv(image_path):
            run_tool(argv, timeout=self.config["start_timeout"], what=f"starting {self.type} {self.name}")
        self.cwd = self.config["cwd"]
        if self.config["fast_exec"]:
            self.helper = ExecHelper(self.host_dir)
            try:
                self.start_helper_process(self.enter_argv(helper_argv()))
            except (ServiceError, OSError) as exc:
                self.helper.close()
                self.helper = None  # commands run without it
                log.warning("fast_exec_unavailable", instance=self.instance_id, error=str(exc))
        self.shell = self.config["shell"] or (self.helper.best_shell if self.helper else "sh")
        return {"container": self.name, "image": image_path, "shell": self.shell, "fast_exec": self.helper is not None}

    def cache_path(self, image: str) -> str:
        root = self.config["cache_dir"] or os.path.join(
            os.environ.get("ARSERVICE_CACHE", os.path.expanduser("~/.cache/arservice")), self.type)
        key = hashlib.sha256(image.encode()).hexdigest()[:24]
        return os.path.join(root, key + self.image_suffix)

    def local_image(self) -> str:
        """A file or directory the tool can start from: the image itself, or its cached conversion."""
        image = self.config["image"]
        if not IMAGE_URI.match(image):
            if not os.path.exists(image):
                raise ServiceError("invalid_request", f"image {image!r} is neither a URI nor a path on this agent")
            return image
        dest = self.cache_path(image)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        # One build per image at a time across agents sharing the cache; the others wait, then reuse it.
        with open(dest + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(dest):
                self._build(image, dest)
        return dest

    def _build(self, image, dest):
        attempts = self.config["build_retries"] + 1
        partial = f"{dest}.{uuid.uuid4().hex[:8]}.partial"
        for attempt in range(1, attempts + 1):
            log.info("image_build_started", image=image, attempt=attempt, dest=dest)
            started = time.monotonic()
            try:
                run_tool(self.build_argv(image, partial), timeout=self.config["build_timeout"],
                         what=f"converting {image}")
                os.replace(partial, dest)
                log.info("image_build_done", image=image, seconds=round(time.monotonic() - started, 1))
                return
            except ServiceError as exc:
                log.warning("image_build_failed", image=image, attempt=attempt, error=exc.message)
                if os.path.isdir(partial):  # apptainer sandboxes are directories
                    shutil.rmtree(partial, ignore_errors=True)
                elif os.path.exists(partial):
                    os.unlink(partial)
                if attempt == attempts:
                    raise
                time.sleep(min(60, 2 ** attempt))

    def command_context(self, cwd: str | None, env: dict[str, str] | None) -> tuple[str | None, dict[str, str]]:
        # The container was started without the spec's env: every command is given it.
        return resolve_path(cwd, self.cwd or "/") if cwd else self.cwd, {**self.config["env"], **(env or {})}

    def restart_helper(self) -> None:
        self.start_helper_process(self.enter_argv(helper_argv()))

    def execute_without_helper(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                               output_limit: int) -> dict[str, Any]:
        """fast_exec false, or the helper could not start: one exec per command."""
        script = script_for(shell_argv(self.shell, command), *self.command_context(cwd, env)).decode()
        argv = self.enter_argv(plain_exec_argv(["sh", "-c", script], timeout))
        # The in-container watchdog kills on time; the host-side timeout is the backstop.
        return plain_result(process.Command(argv, timeout=timeout + 5, output_limit=output_limit, groups=set()).wait(),
                            timeout)

    def write_file(self, path: str, content: bytes, mode: int) -> dict[str, Any]:
        path = resolve_path(path, self.cwd or "/")
        staged = f"file-{uuid.uuid4().hex}"
        # The instance can write to host_dir: never follow a symlink there (it would lead to the host's files).
        with open(os.open(os.path.join(self.host_dir, staged), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW), "wb") as f:
            f.write(content)
        try:
            result = self.execute(f'mkdir -p "$(dirname "$P")" && cp "$S" "$P" && chmod {mode:o} "$P"', 60,
                                  env={"P": path, "S": f"{MOUNT}/{staged}"})
        finally:
            os.unlink(os.path.join(self.host_dir, staged))
        if result["returncode"] != 0:
            raise ServiceError("environment_error", f"could not write {path}: {result['output'].decode(errors='replace')}")
        return {"path": path, "written": len(content)}

    def read_file(self, path: str, limit: int) -> dict[str, Any]:
        path = resolve_path(path, self.cwd or "/")
        staged = f"file-{uuid.uuid4().hex}"
        result = self.execute('[ -f "$P" ] || exit 44; [ "$(wc -c < "$P")" -le "$L" ] || exit 45; cp "$P" "$S"', 60,
                              env={"P": path, "L": str(limit), "S": f"{MOUNT}/{staged}"})
        try:
            if result["returncode"] == 44:
                raise ServiceError("not_found", f"no such file: {path}")
            if result["returncode"] == 45:
                raise ServiceError("payload_too_large", f"{path} is larger than the read limit of {limit} bytes")
            if result["returncode"] != 0:
                raise ServiceError("environment_error", f"could not read {path}: {result['output'].decode(errors='replace')}")
            # The instance may have swapped the copy for a link or a FIFO, or grown it past the limit.
            fd = safefs.open_file(os.path.join(self.host_dir, staged), os.O_RDONLY, shown=path)
            return {"content": safefs.read_limited(fd, limit, path)}
        finally:
            if os.path.exists(os.path.join(self.host_dir, staged)):
                os.unlink(os.path.join(self.host_dir, staged))

    def close(self) -> None:
        self.close_helper()
        if self.name is not None:
            try:
                run_tool(self.stop_argv(), what=f"stopping {self.name}")
            except ServiceError as exc:
                log.warning("stop_failed", name=self.name, error=exc.message)
            self.name = None  # type: ignore[assignment]  # closed: nothing to stop
        if self.host_dir:
            hostdir.remove(self.host_dir)
