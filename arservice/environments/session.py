"""Persistent shell sessions: one bash per session, fed one command at a time through FIFOs.

A session is a long-lived bash started inside the instance the way any command is (through the
exec helper, or as a host process for `local`), so it needs nothing of a terminal: no prompt is
matched, nothing is echoed, and its output is a file, exact bytes. The agent and the session's
bash share a directory (the helper's, at helper.MOUNT inside; a directory of its own for
`local`), holding for session number K:

    sK.in    FIFO, agent -> bash: one line per command ("go"); end of file ends the session.
    sK.cmd   the command, as sent; bash runs it with `eval "$(<sK.cmd)"` at its top level, so
             cd, variables, functions, options and traps persist from one command to the next.
    sK.out   the command's merged stdout and stderr (stdin is /dev/null).
    sK.st    FIFO, bash -> agent: one line per command: its status `$?`; `i` when a timeout
             interrupted it; `f` when that interrupt found it inside a shell function (which a
             trap cannot unwind: bash then ends, and the session with it); `xN` when bash
             itself ended with status N (`exit N`, or killed).
    sK.ctl   FIFO, agent -> sentinel: `int T` on a timeout.
    sK.pid, sK.jobs  the command's first pid, and the background jobs of earlier commands: the
             sentinel tells the command's processes by them.

The sentinel is a second bash, started by the session's bash and reparented away at once (so
it is not one of its jobs, `$!` or `wait` targets). On `int T` it signals the session's bash
(SIGUSR2) and then SIGKILLs every process below that bash that was started at or after clock
tick T (the command's start): background jobs of earlier commands live on, as they would at a
terminal's Ctrl-C. The bash's USR2 trap then writes `i` and goes back to reading: the command is
abandoned at top level, whatever loops it was in, and the session keeps its cwd and variables.
"""

import os
import re
import shlex
import stat
import time
from typing import TYPE_CHECKING, Any

from ..protocol import ServiceError
from ..schemas import SESSION_NAME
from . import safefs
from .process import Watched, command_answer, command_output

if TYPE_CHECKING:
    from .base import Environment

# How long a timed-out command may take to be unwound before its session's bash is ended.
INTERRUPT_GRACE_S = 5.0
START_TIMEOUT_S = 30.0
NAME = re.compile(SESSION_NAME)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FD_IN, FD_CTL = 63, 62  # high descriptors, out of the way of what commands use

# The sentinel: $1 the session's bash, $2 the file holding the first pid of the command (its
# command substitution's); beside it, .jobs lists the background jobs of earlier commands (`jobs
# -p` as the command started), which are never the command's. It walks /proc itself (no ps or
# pkill in minimal images) and makes several passes, as the command may fork while it looks.
# Start times count in clock ticks (10 ms): a process started in the command's first tick is the
# command's if its pid is not below the command's first (wrong only after a pid wraparound, which
# the job list covers for earlier background jobs).
SENTINEL = r"""
s=$1
while read -r op t <&62; do
  [ "$op" = int ] || continue
  kill -USR2 "$s" 2>/dev/null
  { read -r first <"$2"; } 2>/dev/null || first=0
  jobs_before=(); mapfile -t jobs_before <"${2%.pid}.jobs" 2>/dev/null; earlier=" ${jobs_before[*]} "
  for pass in 1 2 3 4 5; do
    declare -A kids=(); found=()
    for f in /proc/[0-9]*/stat; do
      { read -r l <"$f"; } 2>/dev/null || continue
      p=${f#/proc/}; p=${p%/stat}; l=${l##*) }; set -- $l
      kids[$2]+=" $p:${20}"
    done
    todo=("$s")
    while ((${#todo[@]})); do
      q=${todo[0]}; todo=("${todo[@]:1}")
      for e in ${kids[$q]}; do
        c=${e%%:*}
        b=${e#*:}
        if [ "$q" != "$s" ] || { [[ $earlier != *" $c "* ]] && { [ "$b" -gt "$t" ] || { [ "$b" = "$t" ] && [ "$c" -ge "$first" ]; }; }; }; then
          found+=("$c"); todo+=("$c")
        fi
      done
    done
    ((${#found[@]})) || break
    kill -STOP "${found[@]}" 2>/dev/null; kill -KILL "${found[@]}" 2>/dev/null
  done
done
"""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ServiceError("invalid_request", f"a session name is 1 to 64 of A-Z a-z 0-9 _ . -, not {name!r}")
    return name


def check_shell(shell: str) -> str:
    """Sessions run bash: their interrupt and state rely on it. A name or a path to a bash."""
    if not isinstance(shell, str) or os.path.basename(shell) != "bash" or not re.fullmatch(r"[\w./-]+", shell):
        raise ServiceError("invalid_request", f"a session's shell must be bash (a name or a path to it), not {shell!r}")
    return shell


def one_line_quote(text: str) -> str:
    """bash's $'...' quoting, which spells newlines as \\n: the quoted text takes one line."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def loop_script(inside: str, key: str) -> str:
    """The session's bash: its USR2 trap, its sentinel, and the loop that runs each command."""
    base = f"{inside}/{key}"
    status = shlex.quote(base + ".st")
    # In a function the trap cannot leave the command (`continue` does not cross a function):
    # the shell ends, and says so.
    trap = (f"if ((${{#FUNCNAME[@]}})); then echo f 1<>{status}; exit 137; fi; "
            f"echo i 1<>{status}; continue 99")
    sentinel = f"( bash --norc --noprofile -c {one_line_quote(SENTINEL)} sentinel $$ {shlex.quote(base + '.pid')} {FD_CTL}<{shlex.quote(base + '.ctl')} {FD_IN}<&- >/dev/null 2>&1 & )"
    # The command substitution that reads the command is the command's first process: its pid
    # tells the sentinel which processes are the command's.
    read = (f"echo $BASHPID >{shlex.quote(base + '.pid')}; IFS= read -r -d '' c <{shlex.quote(base + '.cmd')}; "
            'printf %s "$c"')
    run = (f'jobs -p >{shlex.quote(base + ".jobs")}; for _ in 1; do eval "$({read})"; done '
           f">{shlex.quote(base + '.out')} 2>&1 </dev/null {FD_IN}<&-")
    # One line: the commands are evaluated on line 1, so $LINENO and error messages count from 1.
    return (f"{sentinel}; trap -- {shlex.quote(trap)} USR2; echo r 1<>{status}; "
            f'while read -r _ <&{FD_IN}; do {run}; echo "$?" 1<>{status}; done')


def launcher(inside: str, key: str, shell: str) -> str:
    """The command that starts the session (in the instance's own shell, as any command): bash,
    and after it its exit status, so that `exit N` in a session is told as such."""
    base = f"{inside}/{key}"
    status = shlex.quote(base + ".st")
    # SHLVL one down: the session's bash counts from where an execute's would, not from this shell.
    return (f"SHLVL=$((${{SHLVL:-1}} - 1)) {shell} --norc --noprofile -c {shlex.quote(loop_script(inside, key))} bash "
            f"{FD_IN}<{shlex.quote(base + '.in')}; echo \"x$?\" 1<>{status}")


class Session:
    """The agent's end of one session: its FIFOs, the bash's own command (`shell_watch`, driven
    by the agent like any command) and the command running now, if any."""

    def __init__(self, name: str, key: str, host_dir: str, inside_dir: str, owner: int | None) -> None:
        self.name = name
        self.key = key
        self.base = os.path.join(host_dir, key)
        self.inside_dir = inside_dir
        self.owner = owner
        self.shell_watch: Watched | None = None
        self.running: SessionStep | None = None  # the SessionStep in flight
        self.ended: str | None = None  # why the session is over, once it is
        self.fds: dict[str, int] = {}
        try:
            for suffix in (".in", ".ctl", ".st"):
                path = self.base + suffix
                if os.path.lexists(path):
                    os.unlink(path)
                os.mkfifo(path, 0o600)
                # Read and write: opening never waits; bash and the sentinel see end of file only
                # once the agent closes its end (or dies), and the status FIFO, written by a new
                # writer per line, never reads as ended between lines.
                fd = safefs.open_file(path, os.O_RDWR, kind=stat.S_ISFIFO, shown=f"the session FIFO {suffix}")
                if owner is not None:
                    os.fchown(fd, owner, owner)
                self.fds[suffix] = fd
        except BaseException:
            self.close_fds()
            raise

    @property
    def status_fd(self) -> int:
        return self.fds[".st"]

    def launcher(self, shell: str) -> str:
        return launcher(self.inside_dir, self.key, shell)

    def send(self, suffix: str, line: str) -> None:
        try:
            os.write(self.fds[suffix], line.encode())
        except (BlockingIOError, KeyError, OSError) as exc:
            raise ServiceError("environment_error", f"session {self.name!r} takes no more input") from exc

    def start_command(self, command: str, timeout: float, output_limit: int) -> "SessionStep":
        """Hand `command` to the session's bash; the step to drive until it is done."""
        if "\0" in command:
            raise ServiceError("invalid_request", "a command cannot hold a NUL byte")
        for suffix in (".cmd", ".out"):  # never follow or reuse what the instance may have put there
            try:
                os.unlink(self.base + suffix)
            except FileNotFoundError:
                pass
        fd = os.open(self.base + ".cmd", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        if self.owner is not None:
            os.fchown(fd, self.owner, self.owner)  # the file made, whatever the name is now
        with open(fd, "wb") as f:
            f.write(command.encode())
        step = SessionStep(self, timeout, output_limit, started_tick=_uptime_ticks())
        self.send(".in", "\n")
        self.running = step
        return step

    def interrupt(self, tick: int) -> None:
        try:
            self.send(".ctl", f"int {tick}\n")
        except ServiceError:
            pass  # the session is gone: nothing runs in it any more

    def close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def remove_files(self) -> None:
        for suffix in (".in", ".ctl", ".st", ".cmd", ".out", ".pid", ".jobs"):
            try:
                os.unlink(self.base + suffix)
            except OSError:
                pass


def _uptime_ticks() -> int:
    """Now, in the clock ticks /proc/PID/stat counts process start times in (since boot)."""
    with open("/proc/uptime", "rb") as f:
        return int(float(f.read().split()[0]) * CLOCK_TICKS)


class SessionStep(Watched):
    """One thing a session does that the agent waits for: its start (the `r` line), or one command.
    It reads status lines from the session's status FIFO; the session's end (`x`) ends it too."""

    def __init__(self, session: Session, timeout: float, output_limit: int | None = None, started_tick: int = 0,
                 starting: bool = False) -> None:
        self.session = session
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.output_limit = output_limit
        self.started_tick = started_tick
        self.starting = starting
        self.fds = (session.status_fd,)
        self.buffer = b""
        self.status: int | None = None  # the command's $?
        self.exit_status: int | None = None  # bash's own, where it ended
        self.interrupted: str | None = None  # `i` or `f`
        self.give_up: float | None = None
        self.cut: int | None = None
        self.done = self.timed_out = False
        self.failure: str | None = None

    def on_readable(self, fd: int) -> bool:
        try:
            chunk = os.read(fd, 256)
        except BlockingIOError:
            return False
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self._on_line(line.decode(errors="replace").strip())
        if len(self.buffer) > 64:  # not ours: the instance can write to the FIFO too
            self.buffer = b""
        return False  # the FIFO is the session's: the agent stops watching it when the step is done

    def _on_line(self, line: str) -> None:
        if line == "r" and self.starting:
            self.done = True
        elif line.startswith("x") and line[1:].isdigit():
            self.exit_status = int(line[1:])
            self.done = True
        elif line in ("i", "f") and self.timed_out:
            self.interrupted = line
            self.done = line == "i"  # after `f` bash ends: its `x` line follows
        elif line.isdigit() and not self.starting:
            self.status = int(line)
            self.done = not self.timed_out  # after an interrupt, its `i` is what ends the step

    def on_deadline(self) -> None:
        now = time.monotonic()
        if self.starting:
            self.failure = "the session's bash did not start inside the instance"
            self.done = True
        elif self.give_up is None:
            self.timed_out = True
            self.give_up = now + INTERRUPT_GRACE_S
            # What the command wrote by its deadline is its output (as for execute).
            try:
                self.cut = os.lstat(self.session.base + ".out").st_size
            except FileNotFoundError:
                self.cut = 0
            self.session.interrupt(self.started_tick)
            self.deadline = self.give_up
        else:  # not unwound in time (the command replaced the USR2 trap, say): end the session
            self.session.ended = "the command could not be interrupted at its timeout, so its session's bash was ended"
            if self.session.shell_watch is not None:
                self.session.shell_watch.kill()
            self.done = True

    def kill(self) -> None:
        if self.session.shell_watch is not None:
            self.session.shell_watch.kill()

    def shell_gone(self, why: str) -> None:
        """The session's bash ended under this step without saying so (killed with its instance)."""
        self.failure = self.failure or why
        self.done = True

    def result(self) -> dict[str, Any]:
        session = self.session
        session.running = None
        if self.exit_status is not None or self.interrupted == "f":
            session.ended = session.ended or (
                "the timeout interrupted a shell function, which cannot be left without ending bash: the session ended"
                if self.interrupted == "f" else f"the session's bash exited with status {self.exit_status}")
        if self.starting:
            if self.done and self.failure is None and self.exit_status is None:
                return {"session": session.name}
            why = self.failure or f"the session's bash exited as it started (status {self.exit_status}: is bash installed?)"
            end(session, why)  # whatever is left of it goes: the name is free again
            raise ServiceError("environment_error", why)
        if self.failure is not None and not self.timed_out:
            raise ServiceError("environment_error", self.failure)
        output, truncated = command_output(session.base + ".out", self.output_limit, self.cut)  # type: ignore[arg-type]  # a command's step has its limit
        if self.timed_out:
            returncode = 137
        elif self.status is not None:
            returncode = self.status
        else:
            returncode = self.exit_status if self.exit_status is not None else 137
        return command_answer(output, truncated, returncode, self.timed_out, self.started,
                              session_ended=session.ended is not None,
                              **({"message": session.ended} if session.ended is not None else {}))


class SessionTable:
    """The sessions of one instance, by name, and the directory their files are in."""

    def __init__(self, env: "Environment") -> None:
        self.env = env
        self.host_dir, self.inside_dir, self.owner, self.own_dir = env.session_dir()
        self.sessions: dict[str, Session] = {}
        self._keys = 0

    def get(self, name: str) -> Session:
        session = self.sessions.get(check_name(name))
        if session is None:
            raise ServiceError("not_found", f"no session {name!r} in instance {self.env.instance_id}")
        return session

    def create(self, name: str) -> Session:
        old = self.sessions.get(check_name(name))
        if old is not None and old.ended is None:
            raise ServiceError("conflict", f"session {name!r} exists already in instance {self.env.instance_id}")
        self._keys += 1
        session = self.sessions[name] = Session(name, f"s{self._keys}", self.host_dir, self.inside_dir, self.owner)
        return session

    def remove(self, session: Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]

    def close_all(self) -> list[Session]:
        """End every session (their bash and all it runs); the ones with a command in flight."""
        busy: list[Session] = []
        for session in list(self.sessions.values()):
            end(session, "the session was closed")
            if session.running is not None:
                busy.append(session)
        self.sessions.clear()
        if self.own_dir:
            from .hostdir import remove_tree
            remove_tree(self.host_dir)
        return busy


def end(session: Session, why: str) -> None:
    """End a session: its bash and everything it runs are killed, its FIFOs closed."""
    session.ended = session.ended or why
    if session.shell_watch is not None:
        session.shell_watch.kill()
    if session.running is not None:
        session.running.shell_gone(why)
