"""What an instance can do to the host through the files it shares with the agent: races with
symlinks, FIFOs and other special files, filling the host's disk."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.agent import workdirs
from arservice.client import ServiceError
from arservice.environments import hostdir
from arservice.environments.helper import MOUNT

from backends import SPECS, params
from helpers import wait_for

# Runs inside a bubblewrap sandbox with the host's /usr: swaps /work/d (a directory) and
# /work/link (a symlink to a host directory) as fast as it can, so that a check of d on the host
# and the open that follows it may see different things.
SWAPPER = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while True:
    libc.renameat2(AT_FDCWD, b"/work/d", AT_FDCWD, b"/work/link", RENAME_EXCHANGE)
"""
RACE_TRIES = 10_000


@pytest.fixture(scope="module")
def client(one_agent_service):
    return one_agent_service.client


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_a_sandbox_racing_symlink_swaps_never_reaches_host_files(client, tmp_path, name):
    """write_file and read_file under /work while the sandbox swaps a directory on the way
    with a symlink to the host: not one try may land on or read from the host."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host only\n")
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        client.write_file(instance_id, "/work/swap.py", SWAPPER)
        setup = (f"mkdir /work/d && echo sandbox > /work/d/secret && ln -s {host} /work/link && "
                 "(python3 /work/swap.py </dev/null >/dev/null 2>&1 &)")
        assert client.execute(instance_id, setup)["returncode"] == 0
        wait_for(lambda: client.execute(instance_id, "[ -L /work/d ]")["returncode"] == 0, what="the swapper running")
        outcomes = {"written": 0, "read": 0, "refused": 0}
        leaked = []
        lock = threading.Lock()

        def attempt(i):
            try:
                if i % 2:
                    client.write_file(instance_id, f"d/pwn-{i}", "x")
                    outcome = "written"
                else:
                    content = client.read_file(instance_id, "d/secret")
                    if b"host" in content:
                        leaked.append(content)
                    outcome = "read"
            except ServiceError as exc:
                outcome = "refused" if exc.code in ("invalid_request", "not_found") else exc.code
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(attempt, range(RACE_TRIES)))
        print(f"{RACE_TRIES} tries in {time.monotonic() - started:.1f}s: {outcomes}")
        landed = [p.name for p in host.iterdir() if p.name != "secret"]
        assert (len(landed), len(leaked)) == (0, 0), \
            f"of {RACE_TRIES // 2} each, {len(landed)} writes landed on the host, {len(leaked)} reads returned a host file"
        assert (host / "secret").read_text() == "host only\n"
        assert set(outcomes) == {"written", "read", "refused"}, f"errors other than a refusal: {outcomes}"
        # The race was real: some tries met the directory, some the symlink.
        assert outcomes["refused"] > 0 and outcomes["written"] > 0 and outcomes["read"] > 0, outcomes
    finally:
        client.close_instance(instance_id)


FIFO_READS = 300  # more than the agent's 256 worker threads
PROMPT_S = 10.0


def start_and_close_promptly(client):
    """A start and a close answer within PROMPT_S: nothing holds up the agent."""
    instance_id = client.request("start_instance", wait_s=PROMPT_S, environment={"type": "local"})["instance_id"]
    client.request("close_instance", wait_s=PROMPT_S, instance_id=instance_id)


@pytest.mark.parametrize("name", params("local", "bubblewrap", "docker-busybox"))
def test_fifos_are_refused_at_once_and_never_hold_up_the_agent(client, name):
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        assert client.execute(instance_id, "mkfifo ff")["returncode"] == 0
        # docker reads through the engine (get_archive pauses the container), never opening the
        # FIFO on this side: a few reads show the refusal; 300 would only measure the engine.
        count = 16 if SPECS[name]["type"] == "docker" else FIFO_READS
        answers = []

        def read(_):
            try:
                client.request("read_file", wait_s=2 * PROMPT_S, instance_id=instance_id, path="ff")
                answers.append("content")
            except ServiceError as exc:
                answers.append(exc.code if "regular file" in exc.message else exc)

        readers = [threading.Thread(target=read, args=(i,)) for i in range(count)]
        for reader in readers:
            reader.start()
        start_and_close_promptly(client)
        for reader in readers:
            reader.join()
        assert answers == ["invalid_request"] * count
        if SPECS[name]["type"] != "docker":  # docker's put_archive replaces a file, never writes into one
            with pytest.raises(ServiceError) as err:
                client.request("write_file", wait_s=PROMPT_S, instance_id=instance_id, path="ff", content=b"x")
            assert err.value.code == "invalid_request" and "regular file" in err.value.message
    finally:
        client.close_instance(instance_id)


@pytest.mark.parametrize("name", params("bubblewrap", "docker-busybox"))
def test_a_command_that_swaps_its_output_file_for_a_fifo_gets_an_error(client, name):
    """The agent reads a helper command's output from a file the instance can replace."""
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        with pytest.raises(ServiceError) as err:
            client.execute(instance_id, f"for f in {MOUNT}/*.out; do rm -f $f; mkfifo $f; done", timeout=PROMPT_S)
        assert err.value.code == "environment_error" and "replaced" in err.value.message
        start_and_close_promptly(client)
        assert client.execute(instance_id, "echo still here")["output"] == "still here\n"
    finally:
        client.close_instance(instance_id)


def mounts_of(instance_id):
    """Mount points on the host whose path names the instance."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if instance_id in line.split()[4]]


def df_kib(client, instance_id, path):
    """The size in KiB of the filesystem at path, as the instance sees it."""
    return int(client.execute(instance_id, f"df -k {path} | tail -n 1")["output"].split()[1])


def fill(client, instance_id, path, size):
    """Write size bytes to path inside the instance, then remove it; the writer's exit status
    (the command's own output may go to the filesystem it fills: the status waits in a variable)."""
    command = f"head -c {size} /dev/zero >{path} 2>/dev/null; s=$?; rm -f {path}; echo $s"
    return int(client.execute(instance_id, command)["output"])


@pytest.mark.parametrize("name", params("docker-busybox", "bubblewrap"))
def test_the_helper_directory_is_a_bounded_tmpfs(client, name):
    """An instance cannot fill the host's disk through the directory its commands' output goes
    to: a tmpfs of its own on the host, of `disk` or at most half the instance's memory (here
    32 MiB either way)."""
    spec = {**SPECS[name], "memory": "64m"} if SPECS[name]["type"] == "docker" else {**SPECS[name], "disk": "32m"}
    instance_id = client.start_instance(spec)["instance_id"]
    try:
        assert df_kib(client, instance_id, MOUNT) == 32 << 10
        assert fill(client, instance_id, f"{MOUNT}/fill", 50_000_000) != 0
        # A command whose output outgrows it is cut short; the instance goes on.
        big = client.execute(instance_id, "head -c 50000000 /dev/zero", output_limit=1000)
        assert big["truncated"] and len(big["output"]) < 2000
        assert client.execute(instance_id, "echo fine")["output"] == "fine\n"
        assert mounts_of(instance_id)
    finally:
        client.close_instance(instance_id)
    assert mounts_of(instance_id) == []


@pytest.mark.parametrize("name", params("bubblewrap", "bubblewrap-per-command"))
def test_bubblewrap_disk_bounds_work_and_tmp(client, name):
    instance_id = client.start_instance({**SPECS[name], "disk": "32m"})["instance_id"]
    try:
        for path in ("/work", "/tmp"):
            assert df_kib(client, instance_id, path) == 32 << 10
            assert fill(client, instance_id, f"{path}/fill", 50_000_000) != 0
        client.write_file(instance_id, "kept", "x")
        assert client.read_file(instance_id, "kept") == b"x"
    finally:
        client.close_instance(instance_id)
    assert mounts_of(instance_id) == []


@pytest.mark.parametrize("name", params("local", "docker-busybox", "podman"))
def test_disk_is_enforced_or_refused(client, name):
    """local isolates nothing; docker bounds the container's writable layer where its storage
    driver can (overlay2 on xfs with pquota), and refuses `disk` elsewhere."""
    try:
        instance_id = client.start_instance({**SPECS[name], "disk": "32m"})["instance_id"]
    except ServiceError as exc:
        assert exc.code == "invalid_request" and "cannot enforce disk" in exc.message
        return
    try:
        assert SPECS[name]["type"] in ("docker", "podman")
        assert fill(client, instance_id, "/fill", 50_000_000) != 0
    finally:
        client.close_instance(instance_id)


def test_disk_takes_sizes_as_memory_does(client):
    for bad in ("lots", 0, -5, True):
        with pytest.raises(ServiceError) as err:
            client.start_instance({"type": "bubblewrap", "disk": bad})
        assert err.value.code == "invalid_request" and "disk" in err.value.message


def test_a_dead_agents_mounts_are_detached_by_the_next_agent(tmp_path):
    """SIGKILL skips close(): the next agent on the host reaps the dead one's directory, tmpfs
    mounts included. (Called directly, on a root of its own: on a shared /tmp/arservice,
    another service's agent may reap first.)"""
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / "dead-agent"
    leftover.mkdir()
    (leftover / workdirs.OWNER_FILE).write_text(f"{socket.gethostname()} {dead.pid}\n")
    mounted = hostdir.make(str(leftover), "i-leftover-", 8)
    try:
        assert os.path.ismount(mounted)
        workdirs.claim(str(tmp_path), "next-agent")
        assert not os.path.exists(mounted) and not leftover.exists()
        with open("/proc/self/mountinfo") as f:
            assert str(tmp_path) not in f.read()
    finally:
        hostdir.unmount_under(str(tmp_path))


WITHOUT_MOUNT = r"""
import os, sys, tempfile
from arservice.environments import backend
from arservice.protocol import ServiceError
cls = backend("bubblewrap")
root = tempfile.mkdtemp(dir=".")  # the test's own directory, which the sandbox's uid can reach
os.chmod(root, 0o755)
try:
    cls("i-bounded", cls.parse_config({"type": "bubblewrap", "disk": "8m"}), "a", root).start()
    sys.exit("disk was not refused")
except ServiceError as exc:
    assert exc.code == "invalid_request" and "cannot enforce disk" in exc.message, exc
env = cls("i-plain", cls.parse_config({"type": "bubblewrap"}), "a", root)
env.start()
try:
    assert env.execute("echo hi > /.arservice/x && echo ok", 10)["output"] == b"ok\n"
finally:
    env.close()
print("plain")
"""


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_an_agent_that_cannot_mount_keeps_plain_directories_and_refuses_disk(name):
    """Without CAP_SYS_ADMIN (an agent not running as root) no tmpfs can be mounted. (Not under
    tmp_path: a root agent's sandbox runs as an unprivileged uid, which cannot reach it.)"""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: no way to drop CAP_SYS_ADMIN for the test")
    directory = tempfile.mkdtemp(prefix="arservice-nomount-")
    os.chmod(directory, 0o755)
    try:
        done = subprocess.run([setpriv, "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                               sys.executable, "-c", WITHOUT_MOUNT], check=False, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, cwd=directory)
    finally:
        hostdir.remove_tree(directory)
    assert done.returncode == 0 and done.stdout.strip() == "plain", done.stderr
    assert "host_dir_unbounded" in done.stdout + done.stderr
