"""bubblewrap: what the sandbox hides and what it lets through."""

import os

import pytest

from arservice.client import ServiceError
from arservice.environments.process import AGENT_MARK, marked_processes

from backends import ROOTFS, SPECS, params
from helpers import Service, proc_status


@pytest.fixture(scope="module")
def client():
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 4}').wait_ready()
    yield svc.client
    assert svc.stop() == 0


@pytest.fixture(params=params("bubblewrap", "bubblewrap-rootfs"))
def spec(request):
    return SPECS[request.param]


def interfaces(client, instance_id):
    return client.execute(instance_id, "tail -n +3 /proc/net/dev | cut -d: -f1")["output"].split()


def test_network_is_off_unless_asked_for(client, spec):
    closed = client.start_instance(spec)["instance_id"]
    opened = client.start_instance({**spec, "network": True})["instance_id"]
    try:
        assert interfaces(client, closed) == ["lo"]
        assert len(interfaces(client, opened)) > 1
    finally:
        client.close_instance(closed)
        client.close_instance(opened)


def test_only_work_is_writable_and_files_stay_there(client, spec):
    instance_id = client.start_instance(spec)["instance_id"]
    try:
        assert client.execute(instance_id, "touch /usr/x")["returncode"] != 0
        marker = f"arservice-{instance_id}"
        assert client.execute(instance_id, f"echo kept > /work/f; echo x > /tmp/{marker}; pwd")["output"] == "/work\n"
        assert client.execute(instance_id, "ls -A /work; cat /work/f")["output"] == "f\nkept\n"
        assert not os.path.exists(f"/tmp/{marker}")  # the sandbox's /tmp is its own
        with pytest.raises(ServiceError) as err:
            client.write_file(instance_id, "/etc/passwd", "x")
        assert err.value.code == "invalid_request" and "/work" in err.value.message
        with pytest.raises(ServiceError) as err:
            client.read_file(instance_id, "../etc/passwd")
        assert err.value.code == "invalid_request"
    finally:
        client.close_instance(instance_id)


@pytest.mark.parametrize("name", params("bubblewrap-rootfs"))
def test_rootfs_is_the_sandbox_root(client, name):
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    try:
        with open(f"{ROOTFS}/etc/debian_version") as f:
            assert client.execute(instance_id, "cat /etc/debian_version")["output"] == f.read()
    finally:
        client.close_instance(instance_id)


def test_limits_bubblewrap_cannot_enforce_are_refused(client):
    for limit in ({"cpus": 1}, {"memory": "1g"}, {"pids": 10}):
        with pytest.raises(ServiceError) as err:
            client.start_instance({"type": "bubblewrap", **limit})
        assert err.value.code == "invalid_request" and "cannot enforce" in err.value.message
    with pytest.raises(ServiceError) as err:
        client.start_instance({"type": "bubblewrap", "network": "some-bridge"})
    assert err.value.code == "invalid_request" and "named network" in err.value.message
    with pytest.raises(ServiceError) as err:
        client.start_instance({"type": "bubblewrap", "root": "/no/such/rootfs"})
    assert err.value.code == "invalid_request" and "/no/such/rootfs" in err.value.message


def test_symlinks_planted_in_the_sandbox_do_not_reach_the_host(client, tmp_path):
    """/work and the helper's directory are writable from inside and read and written by the
    agent on the host, where a symlink would lead to the host's own files."""
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    instance_id = client.start_instance({"type": "bubblewrap"})["instance_id"]
    try:
        plant = (f"ln -s {secret} /work/file; ln -s {tmp_path} /work/dir; "
                 f"for i in $(seq 1 50); do ln -s {secret} /.arservice/$i.cmd; done")
        assert client.execute(instance_id, plant)["returncode"] == 0
        for call in (lambda: client.read_file(instance_id, "file"), lambda: client.write_file(instance_id, "file", "x"),
                     lambda: client.write_file(instance_id, "dir/new", "x")):
            with pytest.raises(ServiceError) as err:
                call()
            assert err.value.code == "invalid_request"
        # Command files go next to the planted links; each is made new, never written through one.
        for _ in range(3):
            try:
                client.execute(instance_id, "true")
            except ServiceError as exc:
                assert exc.code == "environment_error"
        assert secret.read_text() == "host only\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["host-secret"]
    finally:
        client.close_instance(instance_id)


def test_a_sandboxed_helper_carries_its_agents_mark_and_no_command_sees_it(client, spec):
    """Before, a sandbox's clear environment dropped the agent's mark: a helper that outlived its
    bwrap and its agent (the chaos run left one, its parent init) could not be found by the next
    agent's reap, and ran on."""
    started = client.start_instance(spec)
    try:
        mark = f"{AGENT_MARK}={started['agent_id']}".encode()
        # The helper itself (PID 1 of its sandbox's PID namespace), not only the bwrap that started it.
        pid_ones = [pid for pid, _ in marked_processes(mark) if _namespace_pid(pid) == "1"]
        assert len(pid_ones) == 1, pid_ones
        assert AGENT_MARK not in client.execute(started["instance_id"], "env")["output"]
    finally:
        client.close_instance(started["instance_id"])


def _namespace_pid(pid):
    """A process's pid in its own PID namespace (the last of NSpid)."""
    return proc_status(pid, "NSpid").split()[-1]
