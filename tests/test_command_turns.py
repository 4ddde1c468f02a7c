"""A local command's turns (its exit, its output's end, its deadline) in the orders an agent's loop
can take them, on real processes: whatever the order, nothing of a timed-out command is left
behind, and no writer can hold the loop."""

import fcntl
import os
import select
import subprocess
import time

import pytest

from arservice.environments.process import BoundedOutput, Command, _drain

from helpers import live_processes, wait_for

pytestmark = pytest.mark.timeout(30)


def test_a_command_that_exits_as_its_timeout_freezes_it_is_still_killed_whole():
    """The agent's loop polled, the deadline passed and the shell exited, then the deadline's turn
    froze a group whose shell was already gone; the next poll saw the exit and the output's end
    (the child had let go of it). The command was answered, its child left frozen for good, where
    any later command could wake it (`kill -CONT`)."""
    marker = f"arservice-frozen-child-{os.getpid()}"
    cmd = Command(["bash", "-c", f"(exec -a {marker} sleep 300) >/dev/null 2>&1 & exit 0"],
                  timeout=1, output_limit=1 << 20, groups=set())
    try:
        wait_for(lambda: live_processes(marker), timeout=10, what="the background child")
        assert select.select([cmd.pidfd], [], [], 10)[0], "the shell did not exit"
        wait_for(lambda: time.monotonic() >= cmd.deadline, timeout=5, what="the deadline")
        cmd.on_deadline()  # the deadline's turn, before the poll has told of the exit
        assert cmd.timed_out and not cmd.done
        for fd in select.select(list(cmd.fds), [], [], 5)[0]:  # the next turn: the poll's news first,
            cmd.on_readable(fd)
        if not cmd.done:  # then the deadline's turn
            cmd.on_deadline()
        assert cmd.done
        assert cmd.result()["timed_out"]
        wait_for(lambda: not live_processes(marker), timeout=5, what="the frozen child to be killed")
    finally:
        subprocess.run(["pkill", "-9", "-f", marker], check=False)


class RefilledOutput(BoundedOutput):
    """Output whose every chunk waits for the writers to put more in the pipe: the agent's loop on
    a busy host, where writers get a CPU between two of its reads."""

    def __init__(self, fd: int) -> None:
        super().__init__(1 << 20)
        self.fd = fd

    def feed(self, chunk: bytes) -> None:
        super().feed(chunk)
        assert self.total < 1 << 24, "the drain does not stop"
        select.select([self.fd], [], [], 5)


def test_a_drain_reads_at_most_what_the_pipe_holds_while_writers_refill_it():
    """Children writing without end after their command exited could refill the pipe as fast as the
    agent's loop read it, and the drain before their kill never returned."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    writers = [subprocess.Popen(["yes", "refill"], stdout=write_end) for _ in range(4)]
    os.close(write_end)
    try:
        capacity = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
        output = RefilledOutput(read_end)
        assert select.select([read_end], [], [], 5)[0], "the writers wrote nothing"
        for _ in range(5):
            before = output.total
            assert _drain(read_end, output) is False
            assert 0 < output.total - before <= capacity
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
        os.close(read_end)
