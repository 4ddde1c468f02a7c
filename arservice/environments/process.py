"""Run one command as a host process: merged, bounded output; the whole tree killed on timeout."""

import fcntl
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..protocol import ServiceError
from . import safefs

# How long output may keep flowing after a command's main process has exited
# (from background children that still hold the pipe) before they are killed.
AFTER_EXIT_GRACE_S = 0.2
# Longer while one of them runs or waits for a CPU (or the disk): on a loaded host a child forked just before its
# parent exited may not have run yet, and redirecting its output (`daemon >/dev/null &`) would be
# its first act. Looked at again every AFTER_EXIT_RECHECK_S.
AFTER_EXIT_RUNNABLE_GRACE_S = 2.0
AFTER_EXIT_RECHECK_S = 0.1


class BoundedOutput:
    """Keeps the first and the last bytes of a stream up to `limit` in all, and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.tail_limit:  # trim in batches, not on every chunk
                del self.tail[: len(self.tail) - self.tail_limit]

    def value(self) -> tuple[bytes, bool]:
        """(output bytes, truncated), made in one copy, taken once: the buffers are let go (a 64 MiB
        output is then held once, not twice, while its answer is encoded)."""
        keep = min(len(self.tail), self.tail_limit)
        with memoryview(self.tail) as whole, whole[len(self.tail) - keep:] as tail:
            taken = joined(self.head, tail, self.total - len(self.head) - keep)
        self.head, self.tail = bytearray(), bytearray()
        return taken


def joined(head: bytes | bytearray, tail: bytes | memoryview, dropped: int) -> tuple[bytes, bool]:
    """(output, truncated): head and tail with a marker where `dropped` bytes were left out."""
    if dropped <= 0:
        return b"".join((head, tail)), False
    return b"".join((head, f"\n[... {dropped} bytes truncated ...]\n".encode(), tail)), True


def command_output(path: str, limit: int, upto: int | None = None) -> tuple[bytes, bool]:
    """A helper command's output file, as read_bounded reads it: nothing if it is gone, an error if
    the instance replaced it (a symlink or a FIFO where the output should be)."""
    try:
        return read_bounded(path, limit, upto)
    except ServiceError as exc:
        if exc.code != "not_found":
            raise ServiceError("environment_error", f"the command's output file was replaced: {exc.message}") from None
        return b"", False


def command_answer(output: bytes, truncated: bool, returncode: int, timed_out: bool, started: float,
                   **extra: Any) -> dict[str, Any]:
    """A command's answer, as every backend gives it; `started` is its monotonic start time."""
    return {"output": output, "returncode": returncode, "signal": signal_name(returncode), "timed_out": timed_out,
            "truncated": truncated, "duration_s": round(time.monotonic() - started, 6), **extra}


def read_bounded(path: str, limit: int, upto: int | None = None) -> tuple[bytes, bool]:
    """A file's first and last bytes up to `limit` in all, as BoundedOutput keeps a stream's; only
    its first `upto` bytes where that is given (what a command wrote by its deadline).

    The path is in a directory an instance can write to, so a symlink there is refused (on the
    host it would lead to the host's files), and so is a FIFO (it would wait for a writer). The
    instance can also grow the file while it is read (a sparse ftruncate costs it nothing), so
    no read asks for more than the limit (and one byte, to see growth), whatever fstat said."""
    with open(safefs.open_file(path, os.O_RDONLY, shown=os.path.basename(path)), "rb") as f:
        end = os.fstat(f.fileno()).st_size
        if upto is not None:
            end = min(end, upto)
        if end <= limit:
            whole = f.read(limit + 1 if upto is None else min(limit + 1, upto))
            if len(whole) <= limit:
                return whole, False
        head = os.pread(f.fileno(), limit // 2, 0)
        tail_size = limit - limit // 2
        size = os.fstat(f.fileno()).st_size if upto is None else min(os.fstat(f.fileno()).st_size, upto)
        size = max(size, len(head))
        tail = os.pread(f.fileno(), tail_size, max(len(head), size - tail_size)) if tail_size else b""
        return joined(head, tail, size - len(head) - len(tail))


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, parent, group, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


class ProcessTable(NamedTuple):
    """One look at every process in /proc."""
    children: dict[int, list[int]]  # parent pid -> child pids
    busy_groups: set[int]  # process groups with a process that runs or waits for a CPU or the disk (R, D)


_table_lock = threading.Lock()
_table: tuple[float, ProcessTable] = (-1.0, ProcessTable({}, set()))  # (when it was read, what it found): one read serves many commands


def _process_table(newer_than: float) -> ProcessTable:
    """Every process, read from /proc after `newer_than` (monotonic time). A busy host has
    thousands of processes (tens of milliseconds to read): commands that time out together share
    one read."""
    global _table
    with _table_lock:
        taken, table = _table
        if taken <= newer_than:
            taken, table = time.monotonic(), ProcessTable({}, set())
            for entry in os.listdir("/proc"):
                fields = stat_fields(entry) if entry.isdigit() else None
                if fields is None:
                    continue
                state, parent, group = fields[:3]
                table.children.setdefault(int(parent), []).append(int(entry))
                if state in (b"R", b"D"):
                    table.busy_groups.add(int(group))
            _table = (taken, table)
        return table


def runs_or_waits(pgid: int, newer_than: float) -> bool:
    """Whether a process of the group runs or waits for a CPU or the disk, from a look at /proc
    taken after `newer_than`."""
    return pgid in _process_table(newer_than).busy_groups


def descendants(pid: int, newer_than: float | None = None) -> list[int]:
    """Every live descendant of pid, from a look at /proc taken after `newer_than` (now if None)."""
    table = _process_table(time.monotonic() if newer_than is None else newer_than).children
    found, todo = [], [pid]
    while todo:
        for child in table.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def stop_group(pgid: int) -> float:
    """Freeze a process group (SIGSTOP): nothing of it runs on, and nobody's parent changes."""
    _signal(os.killpg, pgid, signal.SIGSTOP)
    return time.monotonic()


def kill_tree(pid: int, stopped_at: float | None = None) -> None:
    """SIGKILL pid's process group and every descendant, including ones that left the group.

    The group must be stopped first (stop_group, whose time is `stopped_at`): a shell killed
    after its children would run on meanwhile and print what comes after the command it waited
    for, and one killed before the look through /proc would leave its children unlinked from it."""
    if stopped_at is None:
        stopped_at = stop_group(pid)
    found = descendants(pid, stopped_at)
    _signal(os.killpg, pid)
    for target in found:
        _signal(os.kill, target)


def signal_name(returncode: int) -> str | None:
    """The signal a shell's exit status 128+N names ("SIGKILL" for 137), or None. Every backend
    reads it off the status as a shell reads $?: inside an instance only the status is known, and
    bash itself cannot tell `exit 137` from SIGKILL."""
    try:
        return signal.Signals(returncode - 128).name if returncode > 128 else None
    except ValueError:
        return None


def shell_status(returncode: int) -> int:
    """A Popen returncode as a shell reports it: -N (killed by signal N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


# The variable an agent puts in its environment (its id), so that every process it starts carries
# it: a later agent on the host finds what a dead one left by it (marked_processes), and kills it.
AGENT_MARK = "ARSERVICE_AGENT"


def marked_processes(prefix: bytes) -> Iterator[tuple[int, bytes]]:
    """(pid, entry) of every other process whose initial environment has an entry starting with
    `prefix` (NAME=...): how processes that left every group and parent are still found."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        mark = next((v for v in variables if v.startswith(prefix)), None)
        if mark is not None:
            yield int(entry), mark


def kill_group(pgid: int) -> None:
    _signal(os.killpg, pgid)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _signal(send: Callable[[int, int], None], target: int, signum: int = signal.SIGKILL) -> None:
    try:
        send(target, signum)
    except OSError:
        pass


class Watched:
    """A running command that whoever watches its file descriptors drives to its end: the agent's
    event loop drives many at once (no thread per command), wait() drives one from the calling
    thread. A subclass has `fds`, `deadline` and `done`, and:

        on_readable(fd)  handle readiness of one of fds; True when fd needs no more watching
        on_deadline()    the deadline passed: end the command, or move the deadline for a grace
        result()         release what the command holds; the result dict `execute` answers with
        kill()           end it now (the agent is shutting down)

    and may have answered(), called once the answer is made (by the agent once it has sent it, by
    wait() once result() returned): for work that must not delay it.
    """

    if TYPE_CHECKING:  # what a subclass has
        fds: Sequence[int]
        deadline: float
        done: bool

        def on_readable(self, fd: int) -> bool: ...
        def on_deadline(self) -> None: ...
        def result(self) -> dict[str, Any]: ...
        def kill(self) -> None: ...

    def wait(self) -> dict[str, Any]:
        with selectors.DefaultSelector() as sel:
            for fd in self.fds:
                sel.register(fd, selectors.EVENT_READ)
            while not self.done:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.on_deadline()
                    continue
                for key, _ in sel.select(remaining):
                    if self.on_readable(key.fd):
                        sel.unregister(key.fd)
        try:
            return self.result()
        finally:
            self.answered()

    def answered(self) -> None:
        pass


def start_process(argv: list[str], cwd: str | None, env: dict[str, str] | None,
                  stdin: int = subprocess.DEVNULL) -> "subprocess.Popen[bytes]":
    """A command's process as Command watches it: its output and errors one pipe, in a session and
    process group of its own (its pid), so that its whole tree can be found and killed."""
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True)


class Command(Watched):
    """One command running as a host process, its output read from a pipe. Background processes
    that let go of the output (redirected, as daemons do) outlive the command. `groups` is the
    caller's set of live process groups: the command's group is in it while anything of it runs,
    so the caller can kill it on close.
    """

    def __init__(self, argv: list[str], *, timeout: float, output_limit: int, groups: set[int], cwd: str | None = None,
                 env: dict[str, str] | None = None, process: "subprocess.Popen[bytes] | None" = None) -> None:
        """`process`: the command's process, already started by start_process() (a waiting shell
        just handed its command); argv, cwd and env are then its business."""
        self.started = time.monotonic()
        self.proc = process or start_process(argv, cwd, env)
        self.groups = groups
        groups.add(self.proc.pid)
        self.output = BoundedOutput(output_limit)
        self.pipe = self.proc.stdout.fileno()  # type: ignore[union-attr]  # stdout=PIPE
        os.set_blocking(self.pipe, False)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.deadline = self.started + timeout
        self.last_deadline = self.deadline  # how long background children may hold the pipe, from the exit on
        self.exited = self.eof = self.timed_out = self.done = False
        self.stopped_at: float | None = None

    @property
    def fds(self) -> tuple[int, int]:  # type: ignore[override]  # read-only here, as Watched.wait needs
        return (self.pipe, self.pidfd)

    def on_readable(self, fd: int) -> bool:
        if fd == self.pidfd:
            self.exited = True
            now = time.monotonic()
            self.last_deadline = min(self.deadline, now + AFTER_EXIT_RUNNABLE_GRACE_S)
            self.deadline = min(self.deadline, now + AFTER_EXIT_GRACE_S)
            finished = True
        else:
            try:
                chunk = os.read(self.pipe, 1 << 16)
            except BlockingIOError:
                return False
            self.output.feed(chunk)
            self.eof = finished = not chunk
        # A command frozen at its timeout is done only once on_deadline has killed what is left of it.
        self.done = self.exited and self.eof and self.stopped_at is None
        return finished

    def on_deadline(self) -> None:
        if self.stopped_at is not None:  # timed out and frozen at the last turn (it may have exited since)
            kill_tree(self.proc.pid, self.stopped_at)
        elif self.exited:  # only background children still hold the pipe
            now = time.monotonic()
            if now < self.last_deadline and runs_or_waits(self.proc.pid, self.deadline):
                self.deadline = min(self.last_deadline, now + AFTER_EXIT_RECHECK_S)
                return
            # Looked at after that look: one that let go and went to sleep meanwhile is not killed.
            if _drain(self.pipe, self.output):
                self.eof = self.done = True
                return
            kill_group(self.proc.pid)
        else:
            # Freeze it now, and kill it at the next turn: the commands that time out together
            # are then killed after one look through /proc.
            self.timed_out = True
            self.stopped_at = stop_group(self.proc.pid)
            return
        self.done = True

    def kill(self) -> None:
        kill_tree(self.proc.pid)

    def result(self) -> dict[str, Any]:
        if not self.eof:  # what is already in the pipe belongs to the command
            _drain(self.pipe, self.output)
        os.close(self.pidfd)
        self.proc.stdout.close()  # type: ignore[union-attr]  # stdout=PIPE
        returncode = self.proc.wait()
        if not group_alive(self.proc.pid):
            self.groups.discard(self.proc.pid)
        data, truncated = self.output.value()
        return command_answer(data, truncated, shell_status(returncode), self.timed_out, self.started)


def _drain(fd: int, output: BoundedOutput) -> bool:
    """Read what is in the pipe now, without waiting for more; True at its end. At most what it
    holds when full: writers still running could refill it as fast as it is read, for ever."""
    budget = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    while budget > 0:
        try:
            chunk = os.read(fd, min(budget, 1 << 16))
        except BlockingIOError:
            return False
        if not chunk:
            return True
        output.feed(chunk)
        budget -= len(chunk)
    return False
