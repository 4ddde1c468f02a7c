"""The fast exec path: one long-lived shell inside an instance that starts each command.

A container exec costs tens of milliseconds before the command does anything. Instead, each
instance runs one helper, a shell loop started once, and a host directory is mounted into the
instance at MOUNT. The agent and the helper talk only through that directory, so no container
engine sits between them:

    in       FIFO, agent -> helper: `run ID SHELL` and `kill ID` lines. When the agent dies its
             end closes; the helper reads end of file and exits (ending a container it is the
             main process of).
    life     FIFO, helper -> agent: `ready SHELL`, then held open: its end of file means the helper
             is gone.
    ID.cmd   the command file the agent writes; ID.out the command's merged output; ID.pid the
             command's process (and process group) inside the instance, for `kill`.
    ID.st    FIFO, per command: its exit status, written by the subshell that waits for it; end
             of file without a status means the instance stopped under it.

So a command is one file descriptor the agent's event loop watches, as a host process is: no
thread waits for it. The agent reads the output file on the host: exact bytes, head and tail by
seeking, any size. Commands stay stateless (a fresh process each), several run at once, and no
Python is needed in the image.

Where the image has bash, the loop runs in bash: job control (`set -m`) gives each command its
own process group, and a command for bash is sourced in a forked subshell, so it costs two
forks and no exec, like `bash -c` without bash's start-up. Elsewhere (busybox, dash) the loop
runs in sh and starts `setsid SHELL ID.cmd`, which costs two more execs.
"""

import itertools
import os
import re
import select
import shlex
import stat
import subprocess
import threading
import time

from ..logs import EventLog
from ..protocol import ProtocolError
from . import safefs
from .process import Watched, kill_group, read_bounded

log = EventLog("helper")

MOUNT = "/.arservice"
# How long a killed command may take to be reported done before it is given up on.
KILL_GRACE_S = 5.0
READY_TIMEOUT_S = 30.0

# In bash, `me` is bash itself and `jc` turns job control on in the waiting subshell, so the
# command it starts gets its own process group; sh has no job control without a terminal, so
# there `setsid` (where the image has it) does that job. The command closes the channels (3, 9)
# so that nothing it leaves behind keeps them open.
LOOP = r"""
d=%(mount)s me= jc=: ss=
if [ -n "$BASH_VERSION" ]; then me=$BASH jc="set -m"
elif command -v setsid >/dev/null 2>&1; then ss=setsid; fi
exec <"$d/in"
echo ready ${me:-$(command -v sh)} >&9
while read -r op id sh; do
  case $op:$sh in
    run:"$me"|run:"${me:+bash}")
      ( exec 3>"$d/$id.st" 9>&-; set -m
        ( echo $BASHPID >"$d/$id.pid"; set +m; . "$d/$id.cmd" ) >"$d/$id.out" 2>&1 </dev/null 3>&-
        echo $? >&3 ) 2>/dev/null & ;;
    run:*)
      ( exec 3>"$d/$id.st" 9>&-; $jc
        $ss "$sh" "$d/$id.cmd" >"$d/$id.out" 2>&1 </dev/null 3>&- & p=$!; echo $p >"$d/$id.pid"; wait $p
        echo $? >&3 ) 2>/dev/null & ;;
    kill:*) p=$(cat "$d/$id.pid" 2>/dev/null) && { kill -9 "-$p" 2>/dev/null || kill -9 "$p" 2>/dev/null; } ;;
  esac
done
""" % {"mount": MOUNT}
# The loop's variables, unset at the top of every command file: a sourced command must not see them.
LOOP_VARIABLES = "d me jc ss op id sh p"


def helper_argv(before=""):
    """The argv that starts the helper inside an instance: in bash where the image has it, else
    in sh. `before` is shell code to run first (a lifetime backstop, say).

    Where there is bash, sh says `ready bash` as soon as it runs and then becomes the bash loop:
    commands sent meanwhile wait in the FIFO, so bash's start-up (about 1.5 ms) overlaps the
    answer to the start instead of delaying it."""
    boot = (f'exec 9>{MOUNT}/life; '
            'command -v bash >/dev/null 2>&1 && echo ready bash >&9 && exec bash -c "$0"; eval "$0"')
    return ["sh", "-c", before + boot, LOOP]


# The fallback, one exec per command: `sh -c PLAIN_EXEC SHELL COMMAND TIMEOUT`. It runs the command
# in its own session with a watchdog that kills the command's group inside the instance on timeout
# (the client side of an exec ending does not stop anything in the container).
PLAIN_EXEC = r"""
ss=; command -v setsid >/dev/null 2>&1 && ss=setsid
$ss "$0" -c "$1" </dev/null 2>&1 & p=$!  # one pipe keeps stdout and stderr in order
$ss sh -c 'sleep "$1"; kill -9 "-$2" 2>/dev/null || kill -9 "$2"' watchdog "$2" "$p" </dev/null >/dev/null 2>&1 & w=$!
wait $p; rc=$?
kill -9 "-$w" 2>/dev/null || kill -9 "$w" 2>/dev/null
exit $rc
"""


def plain_exec_argv(shell, command, timeout):
    """The argv, to run inside the instance, of one command through PLAIN_EXEC."""
    return ["sh", "-c", PLAIN_EXEC, shell, command, f"{timeout:.3f}"]


def mark_plain_timeout(result, timeout):
    """PLAIN_EXEC's watchdog kills with SIGKILL (exit 137): report that as every other path does."""
    if result["returncode"] == 137 and result["duration_s"] >= timeout:
        result.update(returncode=-9, timed_out=True)
    return result


def script_for(command, cwd, env):
    """The command file: change directory, export the variables, then the command itself."""
    bad = [name for name in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
    if bad:
        raise ProtocolError("invalid_request", f"not a valid environment variable name: {bad[0]!r}")
    lines = [f"unset {LOOP_VARIABLES}"]
    lines += [f"cd {shlex.quote(cwd)} || exit 126"] if cwd else []
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    return "\n".join([*lines, command, ""]).encode()


class ExecHelper:
    """The agent's end of one helper: make it before the helper starts (it creates the FIFOs the
    helper opens), then wait_ready() once the helper runs, then spawn() commands from any thread."""

    def __init__(self, host_dir, owner=None):
        """`owner`: the host uid (and gid) the instance runs as, where it is not the agent's: the
        FIFOs it opens are made its own."""
        self.host_dir = host_dir
        self.owner = owner
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # close() must not free a FIFO's fd under send() or alive()
        for name in ("in", "life"):
            os.mkfifo(os.path.join(host_dir, name), 0o600)
        # Read and write: opening never waits for the helper, and the helper sees end of file only
        # when this process is gone.
        self._in = os.open(os.path.join(host_dir, "in"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._life = os.open(os.path.join(host_dir, "life"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        for fd in (self._in, self._life):
            self._own(fd)
        self.best_shell = None

    def wait_ready(self, running, timeout=READY_TIMEOUT_S):
        """Wait for the helper's `ready` line; running() says whether what hosts it still runs."""
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            if time.monotonic() > deadline or not running():
                raise ProtocolError("environment_error", "the exec helper did not start inside the instance")
            if select.select([self._life], [], [], 0.2)[0]:
                chunk = os.read(self._life, 256)
                if not chunk:
                    raise ProtocolError("environment_error", "the exec helper exited as it started")
                line += chunk
        parts = line.split(b"\n")[0].decode(errors="replace").split()
        self.best_shell = parts[1] if len(parts) > 1 else "sh"  # bash where the image has it

    def alive(self):
        """Whether the helper still runs: its end of `life` is still open."""
        with self._lock:
            if self._life is None:
                return False
            poller = select.poll()
            poller.register(self._life, select.POLLIN)
            return not any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0))

    def send(self, line):
        with self._lock:
            if self._in is None:
                raise ProtocolError("environment_error", "the instance is closed")
            try:
                os.write(self._in, line.encode())  # a short line goes in whole or not at all
            except BlockingIOError:
                raise ProtocolError("environment_error", "the exec helper inside the instance takes no more commands")

    def spawn(self, command, timeout, cwd, env, output_limit, shell):
        """Start one command; the HelperCommand to drive to its end."""
        if not self.alive():
            raise ProtocolError("environment_error", "the exec helper inside the instance has exited")
        base = os.path.join(self.host_dir, str(next(self._ids)))
        # The instance can write to this directory: never follow or reuse what it may have put there.
        with open(os.open(base + ".cmd", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            f.write(script_for(command, cwd, env))
        try:
            os.mkfifo(base + ".st", 0o600)
            # Not followed if swapped for a link meanwhile, and not a host file: a FIFO in this directory.
            status = safefs.open_file(base + ".st", os.O_RDONLY, kind=stat.S_ISFIFO, shown="the status FIFO")
            self._own(status)
        except (OSError, ProtocolError):
            _remove(base)
            raise
        try:
            self.send(f"run {os.path.basename(base)} {shell}\n")
        except ProtocolError:
            os.close(status)
            _remove(base)
            raise
        return HelperCommand(self, base, status, timeout, output_limit)

    def _own(self, fd):
        if self.owner is not None:
            os.fchown(fd, self.owner, self.owner)  # the descriptor: what was checked, whatever the name is now

    def close(self):
        with self._lock:
            for fd in (self._in, self._life):
                if fd is not None:
                    os.close(fd)
            self._in = self._life = None


class HelperCommand(Watched):
    """One command started through a helper; its one file descriptor is the end of ID.st."""

    def __init__(self, helper, base, status_fd, timeout, output_limit):
        self.started = time.monotonic()
        self.helper = helper
        self.base = base
        self.status_fd = status_fd
        self.fds = (status_fd,)
        self.output_limit = output_limit
        self.deadline = self.started + timeout
        self.status = b""
        self.done = self.timed_out = False

    def on_readable(self, fd):
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            return False
        self.status += chunk
        # The status line is the last thing written: no need to wait for the end of file too.
        # (Anything longer is not ours: the instance can write to the FIFO too.)
        self.done = not chunk or self.status.endswith(b"\n") or len(self.status) > 16
        return self.done

    def on_deadline(self):
        if self.timed_out:  # killed, yet not reported done within the grace
            log.error("command_not_killed", command=self.base)
            self.done = True
            return
        self.timed_out = True
        self.kill()
        self.deadline = time.monotonic() + KILL_GRACE_S

    def kill(self):
        try:
            self.helper.send(f"kill {os.path.basename(self.base)}\n")
        except ProtocolError:
            pass  # the helper is gone, and its commands with it

    def result(self):
        try:
            if not self.timed_out and not self.status.endswith(b"\n"):
                raise ProtocolError("environment_error", "the instance stopped while the command ran")
            if not self.timed_out and not self.status.strip().isdigit():
                raise ProtocolError("environment_error", f"the command's exit status is garbled: {self.status[:16]!r}")
            try:
                output, truncated = read_bounded(self.base + ".out", self.output_limit)
            except ProtocolError as exc:
                if exc.code != "not_found":  # a symlink or a FIFO where the output should be
                    raise ProtocolError("environment_error", f"the command's output file was replaced: {exc.message}")
                output, truncated = b"", False
            return {
                "output": output,
                "returncode": -9 if self.timed_out else int(self.status),  # as the local backend reports SIGKILL
                "timed_out": self.timed_out,
                "truncated": truncated,
                "duration_s": round(time.monotonic() - self.started, 6),
            }
        finally:
            os.close(self.status_fd)
            _remove(self.base)


def _remove(base):
    for suffix in (".cmd", ".out", ".pid", ".st"):
        try:
            os.unlink(base + suffix)
        except OSError:
            pass  # gone, or a directory the instance put there: close() removes it


def start_process(argv, helper):
    """Start a helper as a host process (`argv` ends in helper_argv()) and wait until it is ready.

    Returns the Popen; the process is in its own session, so killing its group ends it and
    every command it started.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        helper.wait_ready(lambda: proc.poll() is None)
    except ProtocolError:
        kill_group(proc.pid)
        proc.wait()
        raise
    return proc
