"""The fast exec path: one long-lived shell inside an instance that starts each command.

A container exec costs tens of milliseconds before the command does anything. Instead, each
instance runs one helper, a shell loop started once, and a host directory is mounted into the
instance at MOUNT. The agent and the helper talk only through that directory, so no container
engine sits between them:

    in       FIFO, agent -> helper: `run ID` and `kill ID` lines. When the agent dies its end
             closes; the helper reads end of file and exits (ending a container it is the main
             process of).
    life     FIFO, helper -> agent: `ready SHELL`, then held open: its end of file means the helper
             is gone.
    ID.cmd   the command file the agent writes: a few lines of sh that change directory, export
             the variables and exec the user's shell with the command as its last argument, so
             the command runs in a real `bash -c COMMAND` (its own $$, $LINENO, error text).
    ID.out   the command's merged output.
    ID.st    FIFO, per command: its exit status; end of file without a status means the helper
             went away under it.

So a command is one file descriptor the agent's event loop watches, as a host process is: no
thread waits for it. The agent reads the output file on the host: exact bytes, head and tail by
seeking, any size. Several commands run at once, and no Python is needed in the image.

Where the image has bash 5.1 or later, the loop is bash and is meant to be the instance's PID 1
(docker and podman start it as the container's main process, bubblewrap with --as-pid-1). PID 1
gets no signal from inside its PID namespace that it has no handler for, and `kill -1` spares it,
so nothing a command does (`kill -9 $PPID`, `kill -9 -1`, `pkill -9 -f .`) ends the instance.
The commands are its own children, each in its own process group (`set -m`), and it learns their
exit status itself with `wait -n -p`; it never blocks reading the `in` FIFO, which a child reads
for it (one line batch per child; one killed by a command is started again). So a command's
status survives even the death of every other process in the instance. A command costs a fork
and the exec of its shell. Elsewhere (busybox, dash, older bash) the loop runs in sh: a subshell
per command waits for it and reports its status; a command that kills every process (`kill -9
-1`) kills those subshells too, and the commands they waited for then end in an error.
"""

import itertools
import os
import select
import selectors
import shlex
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from ..logs import EventLog
from ..protocol import ServiceError
from . import safefs
from .base import Environment, check_command, shell_argv
from .process import AGENT_MARK, Watched, command_answer, command_output, kill_group, signal_name

log = EventLog("helper")

MOUNT = "/.arservice"
# How long a killed command may take to be reported done before it is given up on.
KILL_GRACE_S = 5.0
KILL_RETRY_S = 0.2
READY_TIMEOUT_S = 30.0

# The sh loop: a subshell per command starts it (in its own session where the image has setsid)
# and reports its status. The subshells close the channels (9, and 3 for the command) so that
# nothing a command leaves behind keeps them open.
SH_LOOP = r"""
trap '' INT  # sh catches SIGINT, so as PID 1 it would get one from a command (its commands ignore it anyway, as background jobs)
unset MARK  # kept in the helper's own environment, where the reap finds it; commands never see it
d=MOUNT ss=
command -v setsid >/dev/null 2>&1 && ss=setsid
exec <"$d/in" 2>/dev/null
while read -r op id; do
  case $id in *[!0-9]*|"") continue ;; esac
  case $op in
    run)
      ( exec 3<>"$d/$id.st" 9>&-
        $ss sh "$d/$id.cmd" >"$d/$id.out" 2>&1 </dev/null 3>&- & p=$!; echo $p >"$d/$id.pid"; wait $p
        echo $? >&3 ) & ;;
    kill) read -r p <"$d/$id.pid" && { kill -9 "-$p" || kill -9 "$p"; } ;;
    quit) exit ;;
  esac
done
""".replace("MOUNT", MOUNT, 1).replace("MARK", AGENT_MARK, 1)

# The bash loop (see the module's doc): `next` starts the child that waits for the next batch of
# lines on `in` and hands them over in the file `lines`; `wait -n -p` wakes the loop when that
# child or a command ends. The status FIFO is opened read-write, which never blocks, even if the
# agent has stopped listening. Its $1 is SHLVL as the instance's processes have it, so a command's
# bash counts from where `docker exec bash` would.
BASH_LOOP = r"""
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || exec sh -c "$2"
if [ "$1" = - ]; then unset SHLVL; else export SHLVL="$1"; fi
unset MARK  # as in the sh loop: bash's own environment (/proc/PID/environ) keeps it, commands do not
d=MOUNT
exec <"$d/in" 2>/dev/null
set -m
declare -A job=() pid=()
inside= pending= f=1
next() {  # readers write to lines0 and lines1 in turn: the next one starts before its lines are taken
  f=$((1 - f))
  ( IFS= read -r l || exit 1; printf '%s\n' "$l"
    while read -t 0 && IFS= read -r l; do printf '%s\n' "$l"; done ) >"$d/lines$f" 9>&- & r=$!
}
take() {
  while read -r op id; do
    case $id in *[!0-9]*|"") continue ;; esac
    case $op in
      run) { . "$d/$id.cmd"; } >"$d/$id.out" 2>&1 </dev/null 9>&- & job[$!]=$id pid[$id]=$! ;;
      kill) [ -n "${pid[$id]}" ] && kill -9 "-${pid[$id]}" ;;
      quit) exit ;;
    esac
  done <"$d/lines$1"
}
running() {  # whether child $1 runs: not once it is a zombie, nor once bash has reaped it
  local state=
  if { read -r _ _ state _ </proc/"$1"/stat; } 2>/dev/null; then [ "$state" != Z ]; else kill -0 "$1" 2>/dev/null; fi
}
pass() {  # report the commands that have ended; take the lines of a reader that has
  for p in "${!job[@]}"; do
    running "$p" && continue
    wait "$p"; s=$?; id=${job[$p]}; echo "$s" 1<>"$d/$id.st"; unset "job[$p]" "pid[$id]"; pending=1
  done
  running "$r" && return
  wait "$r"; s=$?
  [ "$s" = 1 ] && exit
  next; pending=1  # before the commands start, so that they always find the instance as it is
  [ "$s" = 0 ] && take $((1 - f))
}
ended() {  # the CHLD trap, never run inside itself; what ends meanwhile gets another pass
  pending=1
  [ -n "$inside" ] && return
  while :; do
    inside=1
    while [ "$pending" = 1 ]; do pending=0; pass; done
    inside=
    [ "$pending" = 1 ] || break
  done
}
trap ended CHLD
next
while :; do wait -n; ended; done
""".replace("MOUNT", MOUNT, 1).replace("MARK", AGENT_MARK, 1)


def helper_argv(before: str = "") -> list[str]:
    """The argv that starts the helper inside an instance: the bash loop where the image has bash,
    else the sh loop. `before` is shell code to run first (a lifetime backstop, say).

    Where there is bash, sh says `ready bash` as soon as it runs and then becomes the bash loop
    (same pid): commands sent meanwhile wait in the FIFO, so bash's start-up (about 1.5 ms)
    overlaps the answer to the start instead of delaying it."""
    boot = (f'exec 9>{MOUNT}/life; '
            'if command -v bash >/dev/null 2>&1; then echo ready bash >&9; exec bash -c "$1" bash "${SHLVL:--}" "$0"; fi; '
            'echo ready sh >&9; eval "$0"')
    return ["sh", "-c", before + boot, SH_LOOP, BASH_LOOP]


def backstop(seconds: int) -> str:
    """Code for helper_argv's `before` that ends the helper after `seconds` whatever happens to the
    agent: a signal would not do, as the helper is PID 1 and has no handler for one."""
    return f"(sleep {seconds}; echo quit 0 >{MOUNT}/in) >/dev/null 2>&1 & "


# The fallback, one exec per command: `sh -c PLAIN_EXEC TIMEOUT ARGV...`. sh execs the command
# itself, so it keeps the exec's pid, parent (outside the instance: $PPID 0), signal dispositions
# and exit status, as `docker exec C bash -c` would. Beside it, a watchdog in its own session, not
# the command's child, polls the command (its pid with its start time in /proc: a reused pid is
# never killed) and kills its process group (the exec's process leads its own session) on time.
PLAIN_EXEC = r"""
t=$0 ss=; command -v setsid >/dev/null 2>&1 && ss=setsid
read -r s </proc/$$/stat; s=${s##*) }; started() { s=${20}; }; started $s
( $ss sh -c '
t=$1 p=$2 s=$3
read -r u _ </proc/uptime; d=$((${u%.*}${u#*.} + ${t%.*}*100 + (1${t#*.} - 1000)/10))
while read -r l </proc/$p/stat; do
  set -- ${l##*) }; [ "$1" != Z ] && [ "${20}" = "$s" ] || exit 0
  read -r u _ </proc/uptime; u=${u%.*}${u#*.}; [ "$u" -lt "$d" ] || { kill -9 "-$p" || kill -9 "$p"; exit; }
  r=$((d - u)); [ $r -gt 10 ] && r=10; sleep 0.$((r/10))$((r%10))
done' watchdog "$t" $$ "$s" & ) </dev/null >/dev/null 2>&1
exec "$@" </dev/null 2>&1  # one pipe keeps stdout and stderr in order
"""


def plain_exec_argv(argv: list[str], timeout: float) -> list[str]:
    """The argv, to run inside the instance, that runs argv through PLAIN_EXEC."""
    return ["sh", "-c", PLAIN_EXEC, f"{timeout:.3f}", *argv]


def plain_result(result: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Complete a PLAIN_EXEC result: name the signal in its status, and since the watchdog kills
    with SIGKILL (137), say whether it timed out."""
    result["signal"] = signal_name(result["returncode"])
    result["timed_out"] = result["returncode"] == 137 and result["duration_s"] >= timeout
    return result


# Variables a shell sourcing the command file does not export as given, or that change what it
# does: read-only in bash (UID, PPID, SHELLOPTS, BASHOPTS...), computed when read (RANDOM, SECONDS,
# LINENO...), acted on with a warning in the output (LC_*, BASH_COMPAT, BASH_XTRACEFD), changed on
# the way (SHLVL, which bash's `exec` lowers, and `_`), refused or reset by dash (OPTIND, IFS), or
# making its `exec` fail (EXECIGNORE). tests/test_fidelity.py tries each.
SHELL_VARIABLES = frozenset({"_", "DIRSTACK", "EPOCHREALTIME", "EPOCHSECONDS", "EUID", "EXECIGNORE", "FUNCNAME",
                             "GROUPS", "HISTCMD", "IFS", "LINENO", "OPTIND", "PIPESTATUS", "PPID", "RANDOM",
                             "SECONDS", "SHELLOPTS", "SHLVL", "SRANDOM", "UID"})


def exported_as_given(name: str) -> bool:
    return name not in SHELL_VARIABLES and not name.startswith(("BASH", "LC_"))


def script_for(argv: list[str], cwd: str | None, env: dict[str, str]) -> bytes:
    """The command file: change directory, export the variables, then exec argv (the user's shell
    with the command); through `env` where a variable is one a shell would not export as given
    (with PATH, so that `env` is looked up where it was). OLDPWD is the one variable the `cd` sets
    that `docker exec -w` does not. Encoded as Popen encodes arguments (lone surrogates as bytes)."""
    check_command(argv[-1], env)
    through_env = {name for name in env if not exported_as_given(name)}
    if through_env and "PATH" in env:
        through_env.add("PATH")
    lines = [f"cd -- {shlex.quote(cwd)} || exit 126", "unset OLDPWD"] if cwd else []
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items() if name not in through_env]
    given = [f"{name}={value}" for name, value in env.items() if name in through_env]
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in [*(["env", *given] if given else []), *argv]))
    return "\n".join([*lines, ""]).encode("utf-8", "surrogateescape")


class ExecHelper:
    """The agent's end of one helper: make it before the helper starts (it creates the FIFOs the
    helper opens), then wait_ready() once the helper runs, then spawn() commands from any thread."""

    def __init__(self, host_dir: str, pid_one: bool = False, owner: int | None = None) -> None:
        """`owner`: the host uid (and gid) the instance runs as, where it is not the agent's: the
        FIFOs it opens are made its own."""
        self.host_dir = host_dir
        self.owner = owner
        # Whether the helper is its PID namespace's PID 1: its death then kills every command.
        self.pid_one = pid_one
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # close() must not free a FIFO's fd under send() or alive()
        self._revive_lock = threading.Lock()  # one restart at a time
        self._in: int | None = None
        self._life: int | None = None
        self._make_fifos()
        self.best_shell: str = None  # type: ignore[assignment]  # wait_ready() reads it from the helper

    def _make_fifos(self):
        with self._lock:
            for name in ("in", "life"):
                path = os.path.join(self.host_dir, name)
                if os.path.lexists(path):  # a dead helper's
                    os.unlink(path)
                os.mkfifo(path, 0o600)
            # Read and write: opening never waits for the helper, and the helper sees end of file
            # only when this process is gone.
            self._in = os.open(os.path.join(self.host_dir, "in"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._life = os.open(os.path.join(self.host_dir, "life"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            for fd in (self._in, self._life):
                self._own(fd)

    def revive(self, launch: Callable[[], object]) -> None:
        """Start the helper again if it has died (OOM, a bug): launch() starts it over new FIFOs
        and waits until it is ready, or raises (instance_lost where the instance is not revived).
        Called from a worker thread, never the agent's loop."""
        with self._revive_lock:
            if self.alive():
                return
            self.close()
            self._make_fifos()
            try:
                launch()
            except BaseException:
                # New FIFOs that no helper has opened read as a live helper: commands would wait
                # on them until their timeout instead of failing as this one does.
                self.close()
                raise
            log.warning("helper_restarted", directory=self.host_dir)

    def wait_ready(self, running: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
        """Wait for the helper's `ready` line; running() says whether what hosts it still runs."""
        deadline = time.monotonic() + timeout
        line = b""
        with selectors.DefaultSelector() as sel:  # not select(): an agent's fds may be past 1023
            sel.register(self._life, selectors.EVENT_READ)  # type: ignore[arg-type]  # open until close()
            while not line.endswith(b"\n"):
                if time.monotonic() > deadline or not running():
                    raise ServiceError("environment_error", "the exec helper did not start inside the instance")
                if sel.select(0.2):
                    chunk = os.read(self._life, 256)  # type: ignore[arg-type]  # open until close()
                    if not chunk:
                        raise ServiceError("environment_error", "the exec helper exited as it started")
                    line += chunk
        parts = line.split(b"\n")[0].decode(errors="replace").split()
        self.best_shell = parts[1] if len(parts) > 1 else "sh"  # bash where the image has it

    def alive(self) -> bool:
        """Whether the helper still runs: its end of `life` is still open."""
        with self._lock:
            if self._life is None:
                return False
            poller = select.poll()
            poller.register(self._life, select.POLLIN)
            return not any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0))

    def send(self, line: str) -> None:
        with self._lock:
            if self._in is None:
                raise ServiceError("environment_error", "the instance is closed")
            try:
                # A short line goes in whole or not at all. The leading space is for a reader a
                # command has just killed (kill -9 -1): woken by the line, it may still take one
                # byte of it before it dies, and the loops skip leading blanks.
                os.write(self._in, b" " + line.encode())
            except BlockingIOError as exc:
                raise ServiceError("environment_error", "the exec helper inside the instance takes no more commands") from exc

    def spawn(self, command: str, timeout: float, cwd: str | None, env: dict[str, str], output_limit: int,
              shell: str | list[str]) -> "HelperCommand":
        """Start `command` in `shell` (a name or an argv prefix); the HelperCommand to drive to its end."""
        if not self.alive():
            raise ServiceError("environment_error", "the exec helper inside the instance has exited")
        base = os.path.join(self.host_dir, str(next(self._ids)))
        # The instance can write to this directory: never follow or reuse what it may have put there.
        with open(os.open(base + ".cmd", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            f.write(script_for(shell_argv(shell, command), cwd, env))
        try:
            os.mkfifo(base + ".st", 0o600)
            # Not followed if swapped for a link meanwhile, and not a host file: a FIFO in this directory.
            status = safefs.open_file(base + ".st", os.O_RDONLY, kind=stat.S_ISFIFO, shown="the status FIFO")
            self._own(status)
        except (OSError, ServiceError):
            _remove(base)
            raise
        try:
            with self._lock:
                if self._life is None:
                    raise ServiceError("environment_error", "the instance is closed")
                life = os.dup(self._life)
        except (ServiceError, OSError):
            os.close(status)
            _remove(base)
            raise
        try:
            self.send(f"run {os.path.basename(base)}\n")
        except ServiceError:
            os.close(status)
            os.close(life)
            _remove(base)
            raise
        return HelperCommand(self, base, status, life, timeout, output_limit)

    def _own(self, fd):
        if self.owner is not None:
            os.fchown(fd, self.owner, self.owner)  # the descriptor: what was checked, whatever the name is now

    def close(self) -> None:
        with self._lock:
            for fd in (self._in, self._life):
                if fd is not None:
                    os.close(fd)
            self._in = self._life = None


class HelperCommand(Watched):
    """One command started through a helper. It watches two file descriptors: the end of ID.st,
    and its own copy of the helper's `life` FIFO, whose end of file says the helper died (the
    status FIFO then never sees a writer, so it would say nothing)."""

    def __init__(self, helper: ExecHelper, base: str, status_fd: int, life_fd: int, timeout: float,
                 output_limit: int) -> None:
        self.started = time.monotonic()
        self.helper = helper
        self.base = base
        self.status_fd = status_fd
        self.life_fd = life_fd
        self.fds = (status_fd, life_fd)
        self.output_limit = output_limit
        self.deadline = self.started + timeout
        self.give_up: float | None = None
        self.cut: int | None = None
        self.status = b""
        self.done = self.timed_out = False

    def on_readable(self, fd: int) -> bool:
        if fd == self.life_fd:
            try:
                gone = not os.read(fd, 256)  # anything else is a command writing into the FIFO
            except BlockingIOError:
                return False
            if gone:
                self.on_readable(self.status_fd)  # a status written just before the end still counts
                self.done = True
            return gone
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            return False
        self.status += chunk
        # The status line is the last thing written: no need to wait for the end of file too.
        # (Anything longer is not ours: the instance can write to the FIFO too.)
        self.done = not chunk or self.status.endswith(b"\n") or len(self.status) > 16
        return self.done

    def on_deadline(self) -> None:
        """Kill the command, and again every KILL_RETRY_S until it is reported done: the sh loop
        learns a command's pid from its waiter, which may not have written it yet."""
        now = time.monotonic()
        if self.give_up is None:
            self.timed_out = True
            self.give_up = now + KILL_GRACE_S
            # What the command wrote by now is its output: the kill takes a moment to land, and
            # nothing printed after the deadline may come back.
            try:
                self.cut = os.lstat(self.base + ".out").st_size
            except FileNotFoundError:
                self.cut = 0
        elif now >= self.give_up:  # killed, yet not reported done within the grace
            log.error("command_not_killed", command=self.base)
            self.done = True
            return
        self.kill()
        self.deadline = min(now + KILL_RETRY_S, self.give_up)

    def kill(self) -> None:
        try:
            self.helper.send(f"kill {os.path.basename(self.base)}\n")
        except ServiceError:
            pass  # the helper is gone, and its commands with it

    def result(self) -> dict[str, Any]:
        keep: tuple[str, ...] = ()
        try:
            message = None
            if not self.timed_out and not self.status.endswith(b"\n"):
                if self.helper.pid_one and not self.helper.alive():
                    # The kernel killed the command with the namespace's PID 1: that is its status.
                    self.status = b"%d\n" % (128 + signal.SIGKILL)
                    message = ("the instance's exec helper was killed from outside (or out of memory) and every "
                               "process of the instance with it; the next command starts it again, or answers "
                               "instance_lost where the instance is not revived")
                else:
                    if self.helper.alive():
                        # The command may still run (`kill -TERM -1; kill -HUP -1` killed its waiter with
                        # the first kill): ended before the answer, or its next kill would hit the next
                        # command. The helper reads the command's pid from its file, kept for it.
                        keep = (".pid",)
                        self.kill()
                    raise ServiceError("environment_error", self._lost())
            if not self.timed_out and not self.status.strip().isdigit():
                raise ServiceError("environment_error", f"the command's exit status is garbled: {self.status[:16]!r}")
            output, truncated = command_output(self.base + ".out", self.output_limit, self.cut)
            # The status is the shell's: 128+N for a command killed by signal N, as bash -c reports it.
            # A command that timed out was killed (SIGKILL), whatever it managed after the deadline.
            returncode = 128 + signal.SIGKILL if self.timed_out else int(self.status)
            return command_answer(output, truncated, returncode, self.timed_out, self.started,
                                  **({"message": message} if message else {}))
        finally:
            os.close(self.status_fd)
            os.close(self.life_fd)
            _remove(self.base, keep)

    def _lost(self):
        """Why a command's status never came (where it did not die with the helper)."""
        if self.helper.alive():
            return ("the process inside the instance that waited for the command was killed (by a command that "
                    "signals every process, as `kill -9 -1` does, in an image without bash 5.1): its exit status is "
                    "lost, and what still ran of it was killed")
        return ("the exec helper inside the instance ended while the command ran: the command's exit status is lost; "
                "the next command starts the helper again")


def _remove(base, keep=()):
    for suffix in {".cmd", ".out", ".pid", ".st"}.difference(keep):
        try:
            os.unlink(base + suffix)
        except OSError:
            pass  # gone, or a directory the instance put there: close() removes it


class HelperEnvironment(Environment):
    """A backend whose commands run through an exec helper where it has one (fast_exec). This class
    owns the helper once start() has made it: a command goes through it while it runs; a command
    that finds it dead starts it again and goes through the new one; without a helper, the
    backend's own way runs it; close_helper() ends it.

    start() sets `helper` (and `helper_proc`, through start_helper_process, where the helper is a
    host process), and the backend says:

        restart_helper()          how the helper starts again once it has died, if it may
        command_context()         the directory and variables a command gets inside the instance
        spawn_without_helper()    how a command runs without a helper: as a Watched,
        execute_without_helper()  or else on a worker thread
    """

    helper: ExecHelper | None = None
    # The helper's host process, where it is one (a container's helper is its main process instead).
    helper_proc: subprocess.Popen[bytes] | None = None
    shell: str | list[str]  # what commands run in (the spec's `shell`, base.Shell): start() picks it

    # --- what a backend provides ------------------------------------------------------------
    def restart_helper(self) -> None:
        """Start the helper again over the new FIFOs of `helper` and wait until it is ready; raise
        instance_lost where the instance is not to be revived. Called once per death, from a
        worker thread (ExecHelper.revive)."""
        raise NotImplementedError

    def command_context(self, cwd: str | None, env: dict[str, str] | None) -> tuple[str | None, dict[str, str]]:
        """(directory, variables) a command given `cwd` and `env` runs with, as the instance takes them."""
        raise NotImplementedError

    def spawn_without_helper(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                             output_limit: int) -> Watched | None:
        """spawn() where there is no helper: None hands the command to execute_without_helper."""
        return None

    def execute_without_helper(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                               output_limit: int) -> dict[str, Any]:
        """plain_execute() where there is no helper (and spawn_without_helper gave None)."""
        raise NotImplementedError

    # --- the helper's lifecycle -------------------------------------------------------------
    def spawn(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
              output_limit: int) -> Watched | None:
        if self.helper is None:
            return self.spawn_without_helper(command, timeout, cwd, env, output_limit)
        if not self.helper.alive():
            return None  # plain_execute starts it again: on a worker thread, never the agent's loop
        return self.helper.spawn(command, timeout, *self.command_context(cwd, env), output_limit, self.shell)

    def plain_execute(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                      output_limit: int) -> dict[str, Any]:
        """spawn() gave None: the helper died (it starts again, and the command goes through the new
        one), or there is none."""
        if self.helper is None:
            return self.execute_without_helper(command, timeout, cwd, env, output_limit)
        self.helper.revive(self.restart_helper)
        started = self.spawn(command, timeout, cwd, env, output_limit)
        if started is None:
            raise ServiceError("environment_error", "the exec helper inside the instance died again as it restarted")
        return started.wait()

    def start_helper_process(self, argv: list[str]) -> None:
        """Start the helper as a host process running argv (it ends in helper_argv()) and wait until
        it is ready; first end what is left of a dead one. The process is in its own session, so
        killing its group ends it and every command it started."""
        self._end_helper_process()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            self.helper.wait_ready(lambda: proc.poll() is None)  # type: ignore[union-attr]  # start() made it first
        except ServiceError:
            kill_group(proc.pid)
            proc.wait()
            raise
        self.helper_proc = proc

    def session_dir(self) -> tuple[str, str, int | None, bool]:
        """Sessions run through the exec helper, so they share its directory."""
        if self.helper is None or not self.helper.alive():
            raise ServiceError("invalid_request", f"sessions need the exec helper, which this {self.type} instance "
                                                   "does not run (fast_exec false, or it could not start)")
        return self.helper.host_dir, MOUNT, self.helper.owner, False

    def close_helper(self) -> None:
        """close()'s part: end the helper's host process (and every command it started) and close
        the FIFOs. Safe to call twice."""
        self._end_helper_process()
        if self.helper is not None:
            self.helper.close()

    def _end_helper_process(self):
        if self.helper_proc is not None:
            kill_group(self.helper_proc.pid)
            self.helper_proc.wait()
            self.helper_proc = None
