"""Run one command as a host process: merged, bounded output; the whole tree killed on timeout."""

import os
import selectors
import signal
import subprocess
import time

from . import safefs

# How long output may keep flowing after a command's main process has exited
# (from background children that still hold the pipe) before they are killed.
AFTER_EXIT_GRACE_S = 0.2


class BoundedOutput:
    """Keeps the first and the last bytes of a stream up to `limit` in all, and counts the rest."""

    def __init__(self, limit):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk):
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.tail_limit:  # trim in batches, not on every chunk
                del self.tail[: len(self.tail) - self.tail_limit]

    def value(self):
        """(output bytes, truncated)."""
        tail = self.tail[len(self.tail) - self.tail_limit:] if self.tail_limit else b""
        return joined(bytes(self.head), bytes(tail), self.total - len(self.head) - len(tail))


def joined(head, tail, dropped):
    """(output, truncated): head and tail with a marker where `dropped` bytes were left out."""
    if dropped <= 0:
        return head + tail, False
    return head + f"\n[... {dropped} bytes truncated ...]\n".encode() + tail, True


def read_bounded(path, limit):
    """A file's first and last bytes up to `limit` in all, as BoundedOutput keeps a stream's.

    The path is in a directory an instance can write to, so a symlink there is refused (on the
    host it would lead to the host's files), and so is a FIFO (it would wait for a writer). The
    instance can also grow the file while it is read (a sparse ftruncate costs it nothing), so
    no read asks for more than the limit (and one byte, to see growth), whatever fstat said."""
    with open(safefs.open_file(path, os.O_RDONLY, shown=os.path.basename(path)), "rb") as f:
        if os.fstat(f.fileno()).st_size <= limit:
            whole = f.read(limit + 1)
            if len(whole) <= limit:
                return whole, False
        head = os.pread(f.fileno(), limit // 2, 0)
        tail_size = limit - limit // 2
        size = max(os.fstat(f.fileno()).st_size, len(head))
        tail = os.pread(f.fileno(), tail_size, max(len(head), size - tail_size)) if tail_size else b""
        return joined(head, tail, size - len(head) - len(tail))


def descendants(pid):
    """Every live descendant of pid, read from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid):
    """SIGKILL pid's process group and every descendant, including ones that left the group."""
    for target in descendants(pid):
        _signal(os.kill, target)
    _signal(os.killpg, pid)


def kill_group(pgid):
    _signal(os.killpg, pgid)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _signal(send, target):
    try:
        send(target, signal.SIGKILL)
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
    """

    def wait(self):
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
        return self.result()


class Command(Watched):
    """One command running as a host process, its output read from a pipe. Background processes
    that let go of the output (redirected, as daemons do) outlive the command. `groups` is the
    caller's set of live process groups: the command's group is in it while anything of it runs,
    so the caller can kill it on close.
    """

    def __init__(self, argv, *, timeout, output_limit, groups, cwd=None, env=None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True,
        )
        self.groups = groups
        groups.add(self.proc.pid)
        self.output = BoundedOutput(output_limit)
        self.pipe = self.proc.stdout.fileno()
        os.set_blocking(self.pipe, False)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.deadline = self.started + timeout
        self.exited = self.eof = self.timed_out = self.done = False

    @property
    def fds(self):
        return (self.pipe, self.pidfd)

    def on_readable(self, fd):
        if fd == self.pidfd:
            self.exited = True
            self.deadline = min(self.deadline, time.monotonic() + AFTER_EXIT_GRACE_S)
            finished = True
        else:
            try:
                chunk = os.read(self.pipe, 1 << 16)
            except BlockingIOError:
                return False
            self.output.feed(chunk)
            self.eof = finished = not chunk
        self.done = self.exited and self.eof
        return finished

    def on_deadline(self):
        if self.exited:  # only background children still hold the pipe
            kill_group(self.proc.pid)
        else:
            self.timed_out = True
            kill_tree(self.proc.pid)
        self.done = True

    def kill(self):
        kill_tree(self.proc.pid)

    def result(self):
        if not self.eof:  # what is already in the pipe belongs to the command
            _drain(self.pipe, self.output)
        os.close(self.pidfd)
        self.proc.stdout.close()
        returncode = self.proc.wait()
        if not group_alive(self.proc.pid):
            self.groups.discard(self.proc.pid)
        data, truncated = self.output.value()
        return {
            "output": data,
            "returncode": returncode,
            "timed_out": self.timed_out,
            "truncated": truncated,
            "duration_s": round(time.monotonic() - self.started, 6),
        }


def _drain(fd, output):
    """Read what is in the pipe now, without waiting for more."""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        output.feed(chunk)
