"""Attacks by a hostile instance on the host through the files and mounts it shares with the
agent (issue 12 items 2, 3 and 6, tried again after they were fixed). Each test is one attack
through the real service; it fails while the attack works."""

import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from arservice.client import ServiceError
from arservice.environments import backend, hostdir

from backends import SPECS, params
from helpers import Service, live_processes, proc_status, wait_for

NOBODY = 65534


@pytest.fixture(scope="module")
def client(one_agent_service):
    return one_agent_service.client


@pytest.fixture
def reachable_dir():
    """A host directory of the test's that a bubblewrap sandbox can be given: the sandbox runs as
    an unprivileged uid, which cannot reach pytest's tmp_path (under root's 0700 directory)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="arservice-redteam-"))
    path.chmod(0o755)
    yield path
    remove_tree(path)


@pytest.mark.parametrize("name", params("bubblewrap", "bubblewrap-per-command"))
def test_a_sandbox_cannot_make_read_only_host_binds_writable(client, reachable_dir, name):
    """bwrap run by a root agent keeps every capability inside the sandbox, CAP_SYS_ADMIN over
    its own mount namespace included: `mount -o remount,bind,rw` turns the read-only binds of
    the host's /usr and /etc (and of `root`, and of any --ro-bind) into writable ones, and the
    sandbox's root is the host's root."""
    host = reachable_dir / "ro"
    host.mkdir()
    (host / "f").write_text("host only\n")
    instance_id = client.start_instance({**SPECS[name], "bwrap_options": ["--ro-bind", str(host), "/ro"]})["instance_id"]
    try:
        # /usr is only checked (`[ -w ]` is false on a read-only mount, even for root), never written.
        output = client.execute(instance_id, "mount -o remount,bind,rw /ro 2>/dev/null; echo sandbox >/ro/f 2>/dev/null; "
                                             "mount -o remount,bind,rw /usr 2>/dev/null; [ -w /usr ] && echo usr-writable; "
                                             "true")["output"]
        assert (host / "f").read_text() == "host only\n", "the sandbox wrote into a host directory bound read-only"
        assert "usr-writable" not in output, "the sandbox made the host's /usr writable"
    finally:
        client.close_instance(instance_id)


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_a_sandbox_cannot_leave_a_setuid_root_program_for_host_users(client, name):
    """Without `disk`, /work is a plain host directory and the sandbox's root is the host's root:
    it can open its directory to everyone and leave a setuid-root program there, which any
    unprivileged user of the host can then run as root."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: no way to run a program as an unprivileged user")
    started = client.start_instance(SPECS[name])
    instance_id, workdir = started["instance_id"], started["info"]["workdir"]
    try:
        client.execute(instance_id, "chmod 755 /work; cp /usr/bin/id /work/id && chmod 4755 /work/id")
        planted = os.path.join(workdir, "id")
        assert os.path.exists(planted), "the sandbox could not even copy a file into /work: the attack was not tried"
        mode = os.stat(planted).st_mode
        ran = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", planted],
                             check=False, capture_output=True, text=True, timeout=10)
        assert "euid=0" not in ran.stdout, \
            f"an unprivileged host user ran the sandbox's {stat.filemode(mode)} {planted} as root: {ran.stdout}"
    finally:
        client.close_instance(instance_id)



@pytest.mark.parametrize("name", params("bubblewrap", "bubblewrap-per-command"))
def test_a_sandbox_cannot_read_files_only_the_hosts_root_may_read(client, name):
    """The sandbox's root is the host's root (uid_map 0 0 1) and the host's /etc is bound into it:
    it reads /etc/shadow and the SSH host private keys. Read-only is not private. Only a read is
    tried (one byte, thrown away)."""
    secret = "/etc/shadow"
    if not os.path.exists(secret) or os.stat(secret).st_mode & stat.S_IROTH:
        pytest.skip(f"{secret} is not a root-only file on this host: nothing to try")
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        result = client.execute(instance_id, f"head -c 1 {secret} >/dev/null 2>&1 && echo read")
        assert result["output"] != "read\n", f"the sandbox read the host's {secret}"
    finally:
        client.close_instance(instance_id)


@pytest.mark.parametrize("name", params("bubblewrap", "bubblewrap-per-command"))
def test_a_sandbox_cannot_lift_its_disk_bound(client, name):
    """`disk` makes /tmp a tmpfs of that size, mounted by bwrap inside the sandbox's own user
    namespace, where the sandbox holds CAP_SYS_ADMIN: `mount -o remount,size=2g /tmp` lifts the
    bound (the tmpfs of /work, mounted by the agent on the host, refuses the same remount)."""
    instance_id = client.start_instance({**SPECS[name], "disk": "16m"})["instance_id"]
    try:
        sizes = client.execute(instance_id, "mount -o remount,size=2g /tmp 2>/dev/null; mount -o remount,size=2g /work "
                                            "2>/dev/null; df -m /tmp /work | tail -n 2")["output"]
        assert [int(line.split()[1]) for line in sizes.splitlines()] == [16, 16], sizes
    finally:
        client.close_instance(instance_id)


# Runs inside the instance: empty files with long names in a directory, until the filesystem refuses.
MANY_FILES = """
import os, sys
directory, most = sys.argv[1], int(sys.argv[2])
os.mkdir(directory)
made = 0
try:
    while made < most:
        os.close(os.open(os.path.join(directory, f"{made:07d}" + "x" * 200), os.O_CREAT | os.O_WRONLY))
        made += 1
except OSError:
    pass
print(made)
"""
FILES_TRIED = 100_000  # at about 1 KiB of kernel memory each (inode and dentry): some 100 MiB


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_a_disk_bound_tmpfs_bounds_its_files_too(client, name):
    """An empty file takes no block of a tmpfs, only an inode and a dentry: kernel memory the
    size= option does not count and the kernel never reclaims while the file exists. Without
    nr_inodes a tmpfs takes up to half the host's RAM pages in files (3,085,510 here), so a
    `disk: 16m` instance pinned 500 MB of slab with 400,000 empty files while df showed 0 MB used
    (some 4 GB at the inode limit, on each of /work and /.arservice)."""
    instance_id = client.start_instance({**SPECS[name], "disk": "16m"})["instance_id"]
    try:
        client.write_file(instance_id, "/work/many.py", MANY_FILES)
        assert client.execute(instance_id, "mv /work/many.py /tmp/")["returncode"] == 0
        for directory in ("/work/many", "/.arservice/many"):
            made = client.execute(instance_id, f"python3 /tmp/many.py {directory} {FILES_TRIED}; rm -rf {directory}",
                                  timeout=100)["output"]
            assert int(made) < FILES_TRIED, f"a 16 MiB tmpfs took {made} files in {directory}"
    finally:
        client.close_instance(instance_id)

# Runs in a bubblewrap sandbox with the host's python3: waits until the agent opens the output
# file of the command that started it, then extends that file, sparse (it costs the instance's
# tmpfs nothing), while the agent reads it.
GROWER = r"""
import ctypes, os, sys
path, target = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY)
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
libc.inotify_add_watch(watch, path.encode(), 0x20)  # IN_OPEN: from now on, only the agent opens it
open("/work/ready", "w").close()
os.read(watch, 4096)
size = os.fstat(fd).st_size
while size < target:
    size += 1 << 20
    os.ftruncate(fd, size)
"""
OUTPUT_LIMIT = 16 << 20
GROWN = 4 * OUTPUT_LIMIT


@pytest.mark.parametrize("name", params("bubblewrap"))
def test_an_output_file_growing_while_the_agent_reads_it_stays_within_output_limit(client, name):
    """The agent reads a helper command's output file whole when fstat says it is within
    output_limit; a file that grows after that check is read to its end, however far. A sparse
    file costs the instance nothing, so one command can make the agent (then the broker and the
    client) hold gigabytes: here 64 MiB come back for an output_limit of 16 MiB."""
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        client.write_file(instance_id, "/work/grow.py", GROWER)
        command = ("rm -f /work/ready; me=$BASHPID; out=$(readlink /proc/$me/fd/1); "
                   f"(python3 /work/grow.py $out {GROWN} </dev/null >/dev/null 2>&1 &); "
                   f"while [ ! -e /work/ready ]; do :; done; head -c {OUTPUT_LIMIT - 1} /dev/zero")
        sizes = []
        # The grower must start after the agent's size check and before its read ends: about half the tries.
        while len(sizes) < 20 and max(sizes, default=0) <= OUTPUT_LIMIT + 100:
            sizes.append(len(client.execute(instance_id, command, output_limit=OUTPUT_LIMIT, timeout=30)["output"]))
        assert max(sizes) <= OUTPUT_LIMIT + 100, f"output sizes for an output_limit of {OUTPUT_LIMIT}: {sizes}"
    finally:
        client.close_instance(instance_id)


def agent_pid(client):
    return client.available_resources()["agents"][0]["pid"]


def resident_kib(pid, field):
    return int(proc_status(pid, field).split()[0])


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_reading_a_directory_from_docker_is_refused_before_its_contents_are_fetched(client, name):
    """read_file through get_archive checks the size docker reports for the path, then joins the
    whole tar stream in memory: for a directory the size is 4096, and the stream is everything
    under it. A careless client reading "/" or a hostile instance turning an expected file into a
    directory holding a sparse file (free to make, any size) fills the agent's memory."""
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        assert client.execute(instance_id, "mkdir /result && truncate -s 300M /result/sparse")["returncode"] == 0
        pid = agent_pid(client)
        before = resident_kib(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the agent's peak resident memory, to now
        with pytest.raises(ServiceError) as err:
            client.read_file(instance_id, "/result")
        assert err.value.code == "invalid_request"
        grown_mib = (resident_kib(pid, "VmHWM") - before) >> 10
        assert grown_mib < 64, f"refusing to read a directory took {grown_mib} MiB of the agent's memory"
    finally:
        client.close_instance(instance_id)



@pytest.mark.parametrize("name", params("docker-busybox", "docker-plain-exec", "podman"))
def test_an_instance_cannot_fill_the_hosts_disk_through_the_container_log(client, name):
    """The container's main process keeps docker's log pipe (json-file, no size limit here) as
    its stdout, and a command may write to /proc/1/fd/1: 20 MB of zeros become 120 MB of JSON on
    the host's disk, kept as long as the instance lives. The service never reads that log."""
    import docker  # where docker is missing, params() skips this test before it runs
    started = client.start_instance(SPECS[name])
    instance_id, container_id = started["instance_id"], started["info"]["container_id"]
    engine = docker.DockerClient(base_url=backend(SPECS[name]["type"]).url(), timeout=30)
    try:
        client.execute(instance_id, "head -c 20000000 /dev/zero >/proc/1/fd/1")
        log_path = engine.api.inspect_container(container_id)["LogPath"]
        logged = os.path.getsize(log_path) if log_path and os.path.exists(log_path) else 0
        assert logged < 1 << 20, f"the instance wrote {logged} bytes to the host's disk at {log_path}"
    finally:
        client.close_instance(instance_id)
        engine.close()


# Runs inside the instance: a directory tree deeper than Python's recursion limit (1000).
DEEP_TREE = """
import os
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
"""


def remove_tree(root):
    """What a failing run leaves: detach its mounts, then `rm -rf` (iterative, unlike rmtree)."""
    hostdir.unmount_under(str(root))
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=60)


@pytest.mark.parametrize("name", params("bubblewrap", "local"))
def test_a_deep_directory_tree_does_not_stop_an_instance_from_closing_cleanly(reachable_dir, name):
    """close() removes the instance's directory with shutil.rmtree, recursive on Python 3.11:
    a tree 3,000 deep raises RecursionError, which ignore_errors does not catch. The close fails,
    the directory stays, and on bubblewrap the helper's tmpfs is never unmounted (its removal
    comes after /work's). The same rmtree then fails the agent's own exit and the reaping of its
    directory by the next agent on the host: so this test runs its agent under a root of its own,
    never under the shared /tmp/arservice."""
    root = reachable_dir / "root"
    svc = Service("broker", token="s3cret").wait_ready(agents=0)
    agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq, "--workdir-root", str(root)],
                             env=dict(os.environ, ARSERVICE_TOKEN="s3cret"),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: svc.client.available_resources()["agents"], timeout=30, what="the agent registered")
        instance_id = svc.client.start_instance(SPECS[name])["instance_id"]
        try:
            svc.client.write_file(instance_id, "deep.py", DEEP_TREE)
            assert svc.client.execute(instance_id, "python3 deep.py")["returncode"] == 0
        finally:
            try:
                closed = svc.client.close_instance(instance_id)
            except ServiceError as exc:
                closed = exc
        leftovers = [p.name for p in root.glob(f"*/{instance_id}*")]
        assert (closed, leftovers, mounts_of(instance_id)) == ({"instance_id": instance_id, "closed": True}, [], [])
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        svc.stop()
        remove_tree(root)


def mounts_of(instance_id):
    """Mount points on the host whose path names the instance."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if instance_id in line.split()[4]]


@pytest.mark.parametrize("name", params("local"))
def test_a_daemon_that_calls_setsid_does_not_outlive_its_instance(client, name):
    """The README: background processes that redirect their output (daemons) are killed when the
    instance closes. close() kills the process groups of the instance's commands; a daemon that
    starts its own session (setsid, as daemons do) is in none of them once its command has
    ended, and lives on after the close."""
    marker = f"sleep {os.getpid()}.4242"  # an argv no other test has
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        client.execute(instance_id, f"setsid {marker} </dev/null >/dev/null 2>&1 &")
        wait_for(lambda: live_processes(marker), what="the daemon running")
    finally:
        client.close_instance(instance_id)
    try:
        wait_for(lambda: not live_processes(marker), timeout=5, what="the daemon gone after the close")
    finally:
        for pid in live_processes(marker):
            os.kill(pid, signal.SIGKILL)
