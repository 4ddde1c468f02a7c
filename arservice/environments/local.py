"""Commands run as host processes, each instance in its own working directory.

Every process an instance starts carries TAG=<instance id> in its environment, and close() kills
every process on the host whose environment (as it was at its exec) has it: a daemon that calls
setsid leaves the process groups the instance tracks, and is reparented away from the agent,
yet keeps the tag (unless it clears its environment on purpose: `local` isolates nothing).

With `fast_exec`, each command's process is a spare shell started ahead (spare.py). Off by default:
measured, it is no faster than the direct spawn and costs a shell's start more CPU per command
(README, bench/bench_local_exec.py).
"""

import os
import shutil
import signal
import tempfile
from typing import Any

from pydantic import Field

from ..logs import EventLog
from ..protocol import ServiceError
from . import hostdir, process, safefs, spare
from .base import Environment, Shell, Spec, check_command, resolve_path, shell_argv
from .process import Watched

log = EventLog("local")

TAG = "ARSERVICE_INSTANCE"
KILL_PASSES = 10  # a process may fork as the scan passes it: scan again until none is left


def kill_tagged(tag: bytes) -> None:
    """SIGKILL every process whose initial environment holds the entry `tag` (NAME=value)."""
    for _ in range(KILL_PASSES):
        found = False
        for pid, mark in process.marked_processes(tag):
            if mark == tag:
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass  # gone meanwhile
        if not found:
            return


class LocalSpec(Spec):
    shell: Shell = "bash"
    fast_exec: bool = Field(False, description="Each command's process started ahead, as a waiting shell: one process "
                                               "more per instance and a shell's start more CPU per command, "
                                               "and no faster here (README).")


class LocalEnvironment(Environment):
    type = "local"
    can_fork = True
    spec_model = LocalSpec
    workdir: str | None = None
    spares: spare.Spares | None = None  # fast_exec
    groups: set[int] = ()  # type: ignore[assignment]  # a set from start() on; empty for a close() before it

    def start(self) -> dict[str, Any]:
        self.shell = self.config["shell"]
        self.env = {**os.environ, **self.config["env"], TAG: self.instance_id}
        # Started by name, as `bash -c` in a terminal is: $0 and $BASH are then what they would be.
        name = shell_argv(self.shell, "")[0]
        if shutil.which(name, path=self.env.get("PATH")) is None:
            raise ServiceError("environment_error", f"shell {name!r} is not installed on this agent")
        self.workdir = tempfile.mkdtemp(prefix=f"{self.instance_id}-", dir=self.workdir_root)
        self.cwd = self.config["cwd"] or self.workdir
        if not os.path.isdir(self.cwd):
            hostdir.remove_tree(self.workdir)
            raise ServiceError("invalid_request", f"cwd {self.cwd!r} is not a directory on this agent")
        self.groups = set()
        self.plant_seed()
        why_not = self.config["fast_exec"] and spare.unusable(self.env)
        if why_not:
            log.warning("fast_exec_off", instance=self.instance_id, reason=why_not)
        elif self.config["fast_exec"]:
            self.spares = spare.Spares(self.instance_id, self.env)
        return {"workdir": self.workdir, "fast_exec": self.spares is not None}

    def spawn(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
              output_limit: int) -> Watched | None:
        check_command(command, env or {})
        argv = shell_argv(self.shell, command)
        cwd = resolve_path(cwd, self.cwd) if cwd else self.cwd
        merged = {**self.env, **env} if env else self.env
        if self.spares is not None:
            script = spare.command_script(argv, cwd, env or {}, merged)
            handed = self.spares.take(script) if script is not None else None
            if handed is not None:
                return spare.SpareCommand(self.spares, handed, timeout=timeout, output_limit=output_limit,
                                          groups=self.groups)
        return process.Command(argv, timeout=timeout, output_limit=output_limit, groups=self.groups, cwd=cwd,
                               env=merged)

    def session_dir(self) -> tuple[str, str, int | None, bool]:
        """Sessions' files on the host, beside the workdir (not in it, where `ls -a` would show them)."""
        path = tempfile.mkdtemp(prefix=f"{self.instance_id}-sessions-", dir=self.workdir_root)
        return path, path, None, True

    def write_file(self, path: str, content: bytes, mode: int) -> dict[str, Any]:
        path = resolve_path(path, self.cwd)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # No isolation to keep, so links are followed; a FIFO or a device is refused, never waited on.
        safefs.write_all(safefs.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode, follow=True), content, mode)
        return {"path": path, "written": len(content)}

    def read_file(self, path: str, limit: int) -> dict[str, Any]:
        fd = safefs.open_file(resolve_path(path, self.cwd), os.O_RDONLY, follow=True)
        return {"content": safefs.read_limited(fd, limit, path)}

    def host_dirs(self) -> dict[str, str]:
        # Its own directory only: a cwd elsewhere on the host is shared by every instance, as it is.
        return {"work": self.workdir} if self.workdir else {}

    def close(self) -> None:
        if self.spares is not None:
            self.spares.close()
        for pgid in list(self.groups):
            process.kill_group(pgid)
        if self.workdir:
            kill_tagged(f"{TAG}={self.instance_id}".encode())
            hostdir.remove_tree(self.workdir)
