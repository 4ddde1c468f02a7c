"""Commands run as host processes, each instance in its own working directory.

Every process an instance starts carries TAG=<instance id> in its environment, and close() kills
every process on the host whose environment (as it was at its exec) has it: a daemon that calls
setsid leaves the process groups the instance tracks, and is reparented away from the agent,
yet keeps the tag (unless it clears its environment on purpose: `local` isolates nothing).

With `fast_exec`, each command's process is a spare started ahead: `sh` sourcing its stdin, a
pipe, its output already the pipe the agent reads. Handed its script in one atomic write, it
changes directory, sets the environment back to what the direct spawn gives (PWD and OLDPWD
included), and execs the user's shell with the command: the command is the same process, group
and `bash -c` as without fast_exec. The next spare is started once the command's answer is sent,
on a thread of its own. Where a spare cannot give the same result (a script longer than an atomic
pipe write; PATH, or a variable a shell would not export as given, set for the command; a cwd it
may not enter) or cannot take it (gone, stopped, not started yet, or its pipe filled by someone
else), the command is spawned directly. It is off by default: measured, it is no faster than the
direct spawn and costs a shell's start more CPU per command (README, bench/bench_local_exec.py).
"""

import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from ..logs import EventLog
from ..protocol import ServiceError
from . import hostdir, process, safefs
from .base import Environment, Shell, Spec, check_command, resolve_path, shell_argv
from .helper import exported_as_given, script_for
from .process import Watched

log = EventLog("local")

TAG = "ARSERVICE_INSTANCE"
KILL_PASSES = 10  # a process may fork as the scan passes it: scan again until none is left
# Its stdin is a pipe the script comes down in one write (of at most PIPE_BUF bytes: all or nothing).
WAITING_SHELL = ["/bin/sh", "-c", ". /dev/stdin"]
# Starts every instance's next spare, off the agent's loop and the command's path.
SPARE_STARTER = ThreadPoolExecutor(1, thread_name_prefix="spare-shells")
# Variables a `cd` sets, which the command must see as the direct spawn gives them.
CD_VARIABLES = ("PWD", "OLDPWD")


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


class Spare:
    """A waiting shell, and the write end of the pipe it reads its script from."""

    def __init__(self, env: dict[str, str]) -> None:
        read_end, self.trigger = os.pipe()
        try:
            # In "/": the instance may remove its own directory; the script changes to the command's.
            self.proc = process.start_process(WAITING_SHELL, "/", env, stdin=read_end)
        except BaseException:
            os.close(self.trigger)
            raise
        finally:
            os.close(read_end)
        os.set_blocking(self.trigger, False)  # the instance may fill the pipe: the agent never waits on it

    def hand(self, script: bytes) -> bool:
        """Give it its script (at most PIPE_BUF bytes); False if it cannot take it now (gone, or
        stopped, by a process of the instance: local isolates nothing)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t", b"Z"):
                    return False
            return os.write(self.trigger, script) == len(script)
        except OSError:  # gone (ENOENT, EPIPE), or its pipe filled by someone else (EAGAIN: nothing written)
            return False
        finally:
            os.close(self.trigger)


def _end_spare(spare: Spare) -> None:
    process.kill_group(spare.proc.pid)
    spare.proc.wait()


class SpareCommand(process.Command):
    """A command a spare runs. Its instance's next spare is started once its answer is sent: between
    commands, where it competes with none."""

    def __init__(self, start_spare: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_spare = start_spare

    def answered(self) -> None:
        SPARE_STARTER.submit(self.start_spare)


class LocalEnvironment(Environment):
    type = "local"
    can_fork = True
    spec_model = LocalSpec
    workdir: str | None = None
    spare: Spare | None = None  # fast_exec: the next command's process
    closed = False
    groups: set[int] = ()  # type: ignore[assignment]  # a set from start() on; empty for a close() before it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spare_lock = threading.Lock()  # spawn() runs on the agent's loop and, through execute(), on threads

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
        if self.config["fast_exec"]:
            self._start_spare()
        return {"workdir": self.workdir, "fast_exec": self.config["fast_exec"]}

    def spawn(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
              output_limit: int) -> Watched | None:
        check_command(command, env or {})
        argv = shell_argv(self.shell, command)
        cwd = resolve_path(cwd, self.cwd) if cwd else self.cwd
        merged = {**self.env, **env} if env else self.env
        handed = self._hand_to_spare(argv, cwd, env or {}, merged) if self.spare is not None else None
        if handed is None:
            return process.Command(argv, timeout=timeout, output_limit=output_limit, groups=self.groups, cwd=cwd,
                                   env=merged)
        return SpareCommand(self._start_spare, argv, timeout=timeout, output_limit=output_limit, groups=self.groups,
                            process=handed)

    def _start_spare(self) -> None:
        if self.closed:
            return
        try:
            spare = Spare(self.env)
        except OSError as exc:  # no process to spare now (EAGAIN, EMFILE): commands are spawned directly
            log.warning("spare_shell_failed", instance=self.instance_id, error=str(exc))
            return
        with self.spare_lock:
            if not self.closed and self.spare is None:
                self.spare = spare
                return
        os.close(spare.trigger)
        _end_spare(spare)

    def _hand_to_spare(self, argv: list[str], cwd: str, env: dict[str, str],
                       merged: dict[str, str]) -> "subprocess.Popen[bytes] | None":
        """The spare's process, running argv as Popen(argv, cwd, merged) would; None where it cannot
        be the same, or the spare is gone: the caller spawns it then."""
        if "PATH" in env or not all(map(exported_as_given, env)):
            return None  # Popen looks argv up in PATH, and passes every variable as given
        if not (os.path.isdir(cwd) and os.access(cwd, os.X_OK)):
            return None  # Popen fails on it in its own way
        # After the `cd`, what the direct spawn's environment has of PWD and OLDPWD, or nothing.
        restore = "".join(f"unset {name}\n" for name in CD_VARIABLES if name not in merged)
        script = f"exec </dev/null\ncd -- {shlex.quote(cwd)} || exit 126\n{restore}".encode() + script_for(
            argv, None, {**{name: merged[name] for name in CD_VARIABLES if name in merged}, **env})
        if len(script) > select.PIPE_BUF:
            return None
        with self.spare_lock:
            spare, self.spare = self.spare, None
        if spare is None:  # not started yet, closed, or the last one could not be started
            return None
        if spare.hand(script):
            return spare.proc
        _end_spare(spare)
        SPARE_STARTER.submit(self._start_spare)
        return None

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
        with self.spare_lock:
            self.closed = True
            spare, self.spare = self.spare, None
        if spare is not None:
            os.close(spare.trigger)
            _end_spare(spare)
        for pgid in list(self.groups):
            process.kill_group(pgid)
        if self.workdir:
            kill_tagged(f"{TAG}={self.instance_id}".encode())
            hostdir.remove_tree(self.workdir)
