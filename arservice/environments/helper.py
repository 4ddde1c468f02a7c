"""The fast exec path: one long-lived shell inside an instance that starts each command.

A container exec costs tens of milliseconds before the command does anything. Instead, each
instance runs one helper, a shell loop started once, and a host directory is mounted into
the instance at MOUNT. For each command the agent writes MOUNT/ID.cmd on the host and sends
`run ID SHELL` on the helper's stdin; the helper starts the command as its own process in its
own process group, output to MOUNT/ID.out, and prints `done ID RC`. `kill ID` kills that
process group inside the instance. The agent reads the output file on the host: exact bytes,
head and tail by seeking, any size. Commands stay stateless (a fresh process each), several
run at once, and no Python is needed in the image.

Where the image has bash, the loop runs in bash: job control (`set -m`) gives each command its
own process group, and a command for bash is sourced in a forked subshell, so it costs two
forks and no exec, like `bash -c` without bash's start-up. Elsewhere (busybox, dash) the loop
runs in sh and starts `setsid SHELL ID.cmd`, which costs two more execs.
"""

import itertools
import os
import re
import shlex
import subprocess
import threading
import time

from ..logs import EventLog
from ..protocol import ProtocolError
from .process import read_bounded

log = EventLog("helper")

MOUNT = "/.arservice"
# How long a killed command may take to be reported done before it is given up on.
KILL_GRACE_S = 5.0

# In bash, `me` is bash itself and `jc` turns job control on in the waiting subshell, so the
# command it starts gets its own process group; sh has no job control without a terminal, so
# there `setsid` (where the image has it) does that job.
LOOP = r"""
d=%(mount)s me= jc=: ss=
if [ -n "$BASH_VERSION" ]; then me=$BASH jc="set -m"
elif command -v setsid >/dev/null 2>&1; then ss=setsid; fi
echo ready ${me:-$(command -v sh)}
while read -r op id sh; do
  case $op:$sh in
    run:"$me"|run:"${me:+bash}")
      ( set -m; ( echo $BASHPID >"$d/$id.pid"; set +m; . "$d/$id.cmd" ) >"$d/$id.out" 2>&1 </dev/null
        echo "done $id $?" ) 2>/dev/null & ;;
    run:*)
      ( $jc; $ss "$sh" "$d/$id.cmd" >"$d/$id.out" 2>&1 </dev/null & p=$!; echo $p >"$d/$id.pid"; wait $p
        echo "done $id $?" ) 2>/dev/null & ;;
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
    commands sent meanwhile wait in the pipe, so bash's start-up (about 1.5 ms) overlaps the
    answer to the start instead of delaying it."""
    boot = 'command -v bash >/dev/null 2>&1 && echo ready bash && exec bash -c "$0"; eval "$0"'
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
    """Drives one helper. `send(bytes)` writes to its stdin; `lines` yields its stdout lines
    and ends when it exits. Safe to call run() from many threads."""

    def __init__(self, send, lines, host_dir, ready_timeout=30.0):
        self._send = send
        self._send_lock = threading.Lock()
        self.host_dir = host_dir
        self._ids = itertools.count(1)
        self._waiting = {}  # id -> [threading.Event, returncode]
        self.alive = True
        self.best_shell = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(lines,), name="helper-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(ready_timeout) or not self.alive:
            raise ProtocolError("environment_error", "the exec helper did not start inside the instance")

    def _read(self, lines):
        for line in lines:
            parts = line.split()
            if parts[:1] == ["ready"] and not self._ready.is_set():  # the bash loop repeats it
                self.best_shell = parts[1] if len(parts) > 1 else "sh"  # bash where the image has it
                self._ready.set()
            elif len(parts) == 3 and parts[0] == "done" and parts[1] in self._waiting:
                slot = self._waiting[parts[1]]
                slot[1] = int(parts[2])
                slot[0].set()
        self.alive = False
        self._ready.set()
        for slot in list(self._waiting.values()):
            slot[0].set()

    def _write(self, line):
        with self._send_lock:
            self._send(line.encode())

    def run(self, command, timeout, cwd, env, output_limit, shell):
        """Run one command; the result dict `execute` answers with."""
        if not self.alive:
            raise ProtocolError("environment_error", "the exec helper inside the instance has exited")
        started = time.monotonic()
        cmd_id = str(next(self._ids))
        base = os.path.join(self.host_dir, cmd_id)
        with open(base + ".cmd", "wb") as f:
            f.write(script_for(command, cwd, env))
        slot = self._waiting[cmd_id] = [threading.Event(), None]
        try:
            self._write(f"run {cmd_id} {shell}\n")
            timed_out = not slot[0].wait(timeout)
            if timed_out:
                self._write(f"kill {cmd_id}\n")
                if not slot[0].wait(KILL_GRACE_S):
                    log.error("command_not_killed", id=cmd_id, host_dir=self.host_dir)
            if slot[1] is None and not timed_out:
                raise ProtocolError("environment_error", "the instance stopped while the command ran")
            try:
                output, truncated = read_bounded(base + ".out", output_limit)
            except FileNotFoundError:
                output, truncated = b"", False
            return {
                "output": output,
                "returncode": -9 if timed_out else slot[1],  # as the local backend reports SIGKILL
                "timed_out": timed_out,
                "truncated": truncated,
                "duration_s": round(time.monotonic() - started, 6),
            }
        finally:
            del self._waiting[cmd_id]
            for suffix in (".cmd", ".out", ".pid"):
                try:
                    os.unlink(base + suffix)
                except FileNotFoundError:
                    pass


def start_piped(argv, host_dir):
    """Start a helper as a host process (`argv` ends in helper_argv()) talking over pipes.

    Returns (ExecHelper, Popen); the process is in its own session, so killing its group ends
    it and every command it started.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def send(data):
        proc.stdin.write(data)
        proc.stdin.flush()

    try:
        return ExecHelper(send, (line.decode(errors="replace").rstrip("\n") for line in proc.stdout), host_dir), proc
    except ProtocolError:
        proc.kill()
        proc.wait()
        raise
