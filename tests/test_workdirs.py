"""Agent directories holding instance tmpfs mounts: removed whole, and found again by a later
agent when the owner file went but the mounts stayed (issue 14, leak 2). Real tmpfs mounts."""

import os
import socket
import subprocess

import pytest

from arservice.agent import workdirs
from arservice.environments import hostdir

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CAP_SYS_ADMIN)")]


def dead_pid() -> int:
    """A pid no process has now (it had one a moment ago: not one another test may be using)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not workdirs.alive(proc.pid)
    return proc.pid


def agent_dir(root, pid: int) -> str:
    """An agent's directory as agent.Agent names it, with an instance tmpfs, a tmpfs inside that,
    and a file in each."""
    path = os.path.join(root, f"{socket.gethostname()}-{pid}-{os.urandom(2).hex()}")
    os.mkdir(path)
    instance = hostdir.make(path, "i-test-", 1)
    inner = hostdir.make(instance, "exec-", 1)
    for directory in (instance, inner):
        with open(os.path.join(directory, "f"), "w") as f:
            f.write("x")
    assert len(hostdir.mounts_under(path)) == 2
    return path


@pytest.fixture
def root(tmp_path):
    yield str(tmp_path)
    hostdir.unmount_under(str(tmp_path))


def test_a_dead_agents_directory_without_its_owner_file_is_reaped_mounts_and_all(root):
    """Before, reap looked only for owner files: a directory whose owner file went while its
    instances' tmpfs mounts stayed (rm --one-file-system skips them) was never removed."""
    dead = agent_dir(root, dead_pid())
    live = agent_dir(root, os.getpid())  # no owner file either, but its agent (this test) lives
    busy = subprocess.Popen(["sleep", "60"], cwd=hostdir.mounts_under(dead)[-1])  # a mount still in use
    try:
        assert workdirs.reap(root) == [dead]
        assert not os.path.exists(dead) and hostdir.mounts_under(dead) == []
        assert len(hostdir.mounts_under(live)) == 2 and os.listdir(live)
    finally:
        busy.kill()
        busy.wait()


def test_release_removes_an_agents_directory_mounts_and_all(root):
    path = agent_dir(root, os.getpid())
    with open(os.path.join(path, workdirs.OWNER_FILE), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    busy = subprocess.Popen(["sleep", "60"], cwd=hostdir.mounts_under(path)[0])
    try:
        workdirs.release(path)
        assert not os.path.exists(path) and hostdir.mounts_under(path) == []
    finally:
        busy.kill()
        busy.wait()
