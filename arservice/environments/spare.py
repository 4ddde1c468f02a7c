"""Spare shells: a local instance's next command's process, started ahead (`fast_exec`).

A spare is `dash -c '. /dev/stdin'`, its output already the pipe the agent reads. Handed its script
in one write of at most PIPE_BUF bytes (which a pipe takes whole or not at all, so a pipe another
process filled is passed over, never waited on), it changes directory as Popen's `cwd` does, sets
PWD and OLDPWD back to what Popen's `env` has, exports the command's variables, and execs argv: the
command is then the process, group and environment Popen(argv, cwd, env) would have made (the
same variables; only their order in the environment block, /proc/PID/environ, is dash's).
What it cannot make the same (a longer script, PATH or a variable a shell does not export as given,
a cwd Popen fails on) or cannot take (gone, stopped, not started yet) is left to the direct spawn.

The next spare is started once the command's answer is sent (SpareCommand.answered), on one thread
for every instance: started beside the command, it competed with it for the CPU. A spare whose agent
died reads end of file and exits. dash, because it passes on every variable it inherits except
DASH_RESETS (and PWD, which the script sets back) and names that are no shell variable's; bash, as
/bin/sh on some systems, rewrites `_`. An instance whose environment has one of those gets no spares.
"""

import os
import select
import shlex
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..logs import EventLog
from . import process
from .base import is_variable_name
from .helper import exported_as_given, script_for

log = EventLog("spare")

WAITING_SHELL = "dash"
STARTER = ThreadPoolExecutor(1, thread_name_prefix="spare-shells")
# What dash sets on its start whatever its environment says: an instance whose environment has one
# gets no spares.
DASH_RESETS = ("IFS", "OPTIND", "PPID")
CD_VARIABLES = ("PWD", "OLDPWD")  # what the `cd` sets: set back to the environment's


def unusable(env: dict[str, str]) -> str | None:
    """Why spares cannot start commands with this environment as Popen does, or None."""
    if shutil.which(WAITING_SHELL, path=env.get("PATH")) is None:
        return f"{WAITING_SHELL} is not installed"
    reset = [name for name in DASH_RESETS if name in env]
    if reset:
        return f"{WAITING_SHELL} resets {reset[0]}, which the environment sets"
    dropped = [name for name in env if not is_variable_name(name)]
    return f"{WAITING_SHELL} drops {dropped[0]!r}, not a shell variable's name" if dropped else None


def command_script(argv: list[str], cwd: str, variables: dict[str, str], env: dict[str, str]) -> bytes | None:
    """What a spare runs to be Popen(argv, cwd=cwd, env=env), where env is the spare's own environment
    with the command's `variables`; None where it cannot be the same."""
    if "PATH" in variables or not all(map(exported_as_given, variables)):
        return None  # Popen looks argv up in PATH, and passes every variable as given
    if not (os.path.isdir(cwd) and os.access(cwd, os.X_OK)):
        return None  # Popen fails on it in its own way
    # Resolved here, as chdir in a child of the agent would (a logical `cd` reads `link/..` as text,
    # and /proc/self is the spare's own, not the agent's).
    unset = "".join(f"unset {name}\n" for name in CD_VARIABLES if name not in env)
    script = (f"exec <>/dev/null\ncd -P -- {shlex.quote(os.path.realpath(cwd))} || exit 126\n{unset}"
              .encode("utf-8", "surrogateescape")) + script_for(
        argv, None, {**{name: env[name] for name in CD_VARIABLES if name in env}, **variables})
    return script if len(script) <= select.PIPE_BUF else None


class Spare:
    """A waiting shell, and the write end of the pipe it reads its script from."""

    def __init__(self, env: dict[str, str]) -> None:
        read_end, self.trigger = os.pipe()
        try:
            # In "/": the instance may remove its own directory; the script changes to the command's.
            self.proc = process.start_process([WAITING_SHELL, "-c", ". /dev/stdin"], "/", env, stdin=read_end)
        except BaseException:
            os.close(self.trigger)
            raise
        finally:
            os.close(read_end)
        os.set_blocking(self.trigger, False)  # the instance may fill the pipe: the agent never waits on it

    def hand(self, script: bytes) -> bool:
        """Give it its script; False if it cannot take it now. Best effort against the instance
        (`local` isolates nothing): a spare stopped just after the look at its state waits for the
        command's timeout."""
        try:
            fields = process.stat_fields(self.proc.pid)
            if fields is None or fields[0] in (b"T", b"t", b"Z"):
                return False
            return os.write(self.trigger, script) == len(script)
        except OSError:  # gone (EPIPE), or its pipe filled by someone else (EAGAIN: nothing written)
            return False
        finally:
            os.close(self.trigger)
            self.trigger = -1

    def end(self) -> None:
        """Kill and reap a spare that was not handed a command."""
        if self.trigger >= 0:
            os.close(self.trigger)
            self.trigger = -1
        process.kill_group(self.proc.pid)
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]  # stdout=PIPE


class Spares:
    """One instance's spare: at most one at a time, the next started once the last is used."""

    def __init__(self, instance_id: str, env: dict[str, str]) -> None:
        self.instance_id = instance_id
        self.env = env
        self.lock = threading.Lock()  # taken by the agent's loop, worker threads (execute) and STARTER
        self.spare: Spare | None = None
        self.starting = False
        self.closed = False
        self._start()

    def take(self, script: bytes) -> "subprocess.Popen[bytes] | None":
        """The spare's process, handed the script; None if there is none that can take it."""
        with self.lock:
            spare, self.spare = self.spare, None
        if spare is not None and spare.hand(script):
            return spare.proc
        if spare is not None:
            STARTER.submit(spare.end)  # off the caller's thread, which may be the agent's loop
        self.replace()
        return None

    def replace(self) -> None:
        """Have a spare started if there is none and none is starting (once one was used, or its start failed)."""
        with self.lock:
            if self.closed or self.spare is not None or self.starting:
                return
            self.starting = True
        STARTER.submit(self._start)

    def _start(self) -> None:
        try:
            spare = Spare(self.env)
        except OSError as exc:  # no process to spare now (EAGAIN, EMFILE): the next command tries again
            log.warning("spare_shell_failed", instance=self.instance_id, error=str(exc))
            spare = None
        with self.lock:
            self.starting = False
            if spare is not None and not self.closed and self.spare is None:
                self.spare, spare = spare, None
        if spare is not None:
            spare.end()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.end()


class SpareCommand(process.Command):
    """A command a spare runs: the next spare is started once its answer is sent, between commands."""

    def __init__(self, spares: Spares, process: "subprocess.Popen[bytes]", **kwargs: Any) -> None:
        super().__init__([], process=process, **kwargs)
        self.spares = spares

    def answered(self) -> None:
        self.spares.replace()
