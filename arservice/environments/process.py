"""Run one command as a host process: merged, bounded output; the whole tree killed on timeout."""

import os
import selectors
import signal
import subprocess
import time

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
        dropped = self.total - len(self.head) - len(tail)
        if dropped <= 0:
            return bytes(self.head + self.tail), False
        marker = f"\n[... {dropped} bytes truncated ...]\n".encode()
        return bytes(self.head) + marker + bytes(tail), True


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


def run(argv, *, timeout, output_limit, groups, cwd=None, env=None):
    """Run argv in a new session; return the result dict that `execute` answers with.

    Background processes that let go of the output (redirected, as daemons do) outlive
    the command. `groups` is the caller's set of live process groups: the command's
    group is in it while anything of it runs, so the caller can kill it on close.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=cwd, env=env, start_new_session=True,
    )
    groups.add(proc.pid)
    output = BoundedOutput(output_limit)
    pipe = proc.stdout.fileno()
    os.set_blocking(pipe, False)
    pidfd = os.pidfd_open(proc.pid)
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        exited = eof = False
        deadline = started + timeout
        while not (exited and eof):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if exited:  # only background children still hold the pipe
                    kill_group(proc.pid)
                    break
                timed_out = True
                kill_tree(proc.pid)
                break
            for key, _ in sel.select(remaining):
                if key.fd == pidfd:
                    exited = True
                    sel.unregister(pidfd)
                    deadline = min(deadline, time.monotonic() + AFTER_EXIT_GRACE_S)
                else:
                    chunk = os.read(pipe, 1 << 16)
                    if chunk:
                        output.feed(chunk)
                    else:
                        eof = True
                        sel.unregister(pipe)
    if not eof:  # what is already in the pipe belongs to the command
        _drain(pipe, output)
    os.close(pidfd)
    proc.stdout.close()
    returncode = proc.wait()
    if not group_alive(proc.pid):
        groups.discard(proc.pid)
    data, truncated = output.value()
    return {
        "output": data,
        "returncode": returncode,
        "timed_out": timed_out,
        "truncated": truncated,
        "duration_s": round(time.monotonic() - started, 6),
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
