"""fork_instance: new instances whose files are copies of a running instance's, on its agent."""

import os

import docker
import pytest

from arservice.client import ServiceError
from arservice.environments import backend

from backends import SPECS, params
from helpers import Service, wait_for

pytestmark = pytest.mark.timeout(180)

# Files of every kind an agent leaves: a tree, a link (to a host file: it must stay a link), a FIFO
# (never read while copying), bytes that are not text, modes.
MAKE_FILES = ("mkdir -p tree/a/b && printf 'one\\n' > tree/a/b/f && printf '\\000\\377bin' > tree/bin "
              "&& chmod 600 tree/bin && printf '#!/bin/sh\\necho ran\\n' > tree/run && chmod 755 tree/run "
              "&& ln -s /etc/hostname tree/link && mkfifo tree/fifo")
# What a fork must show the same: every entry's type, mode, size and link target, and the contents.
LISTING = "cd tree && find . | sort | while read -r p; do stat -c '%F %a %s %N' \"$p\"; done; cat a/b/f bin | od -c; ./run"


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--max-resources", '{"instances": 6}').wait_ready()
    yield svc
    assert svc.stop() == 0


def fork_images(source_id):
    """Images committed for forks of `source_id` still on dockerd."""
    client = docker.from_env()
    try:
        return client.images.list(filters={"label": f"arservice.commit_of={source_id}"})
    finally:
        client.close()


@pytest.mark.parametrize("name", params("local", "docker-busybox", "podman", "bubblewrap"))
def test_forks_start_with_the_files_and_then_go_their_own_way(service, name):
    client = service.client
    source = source_id = client.start_instance(SPECS[name])["instance_id"]
    forks = []
    try:
        assert client.execute(source, MAKE_FILES)["returncode"] == 0
        listing = client.execute(source, LISTING)
        assert listing["returncode"] == 0 and "symbolic link" in listing["output"] and "fifo" in listing["output"]
        answer = client.fork_instance(source, 3)
        forks = [i["instance_id"] for i in answer["instances"]]
        assert answer["source"] == source and len(set(forks)) == 3 and source not in forks
        assert all(i["environment"] == SPECS[name] and i["agent_id"] for i in answer["instances"])
        for fork in forks:
            copied = client.execute(fork, LISTING)
            assert (copied["output"], copied["returncode"]) == (listing["output"], 0)
        # Each goes its own way: what one writes, the others and the source do not see.
        client.execute(forks[0], "echo changed > tree/a/b/f; touch tree/new")
        for other in (source, forks[1], forks[2]):
            assert client.execute(other, "cat tree/a/b/f; ls tree/new 2>&1 >/dev/null | wc -l")["output"] == "one\n1\n"
        # The source may go first: its forks do not depend on it.
        client.close_instance(source)
        source = None
        assert client.execute(forks[1], "cat tree/a/b/f")["output"] == "one\n"
    finally:
        for instance_id in [source, *forks]:
            if instance_id is not None:
                client.close_instance(instance_id)
    if name == "docker-busybox":
        assert fork_images(source_id) == []  # the committed image went with its last container
    assert client.available_resources()["used"]["instances"] == 0


def test_bad_forks_are_refused_and_change_nothing(service):
    client = service.client
    source = client.start_instance({"type": "local"})["instance_id"]
    try:
        used = client.available_resources()["used"]
        for count, code in ((0, "invalid_request"), (65, "invalid_request"), ("2", "invalid_request"),
                            (True, "invalid_request"), (6, "no_capacity")):
            with pytest.raises(ServiceError) as err:
                client.fork_instance(source, count)
            assert err.value.code == code, (count, err.value)
        assert "instances" in err.value.message  # six more would pass the limit of 6
        with pytest.raises(ServiceError) as err:
            client.fork_instance("i-000000000000", 1)
        assert err.value.code == "not_found"
        assert client.available_resources()["used"] == used
        # Over HTTP too, and a fork of a fork.
        [fork] = service.http.fork_instance(source, 1)["instances"]
        [grandchild] = service.http.fork_instance(fork["instance_id"])["instances"]
        for instance_id in (fork["instance_id"], grandchild["instance_id"]):
            client.close_instance(instance_id)
    finally:
        client.close_instance(source)


def test_a_backend_that_cannot_fork_says_so(tmp_path):
    cls = backend("apptainer")
    env = cls("i-0123456789ab", cls.parse_config({"type": "apptainer", "image": "docker://x:1"}), "agent", str(tmp_path))
    with pytest.raises(ServiceError) as err:
        env.fork([])
    assert err.value.code == "invalid_request" and "cannot be forked" in err.value.message


@pytest.mark.parametrize("name", params("local", "docker-busybox", "podman", "bubblewrap"))
def test_a_named_snapshot_starts_instances_with_the_files_it_kept(service, name):
    client = service.client
    snapshot = f"snap-{name}"
    source = client.start_instance(SPECS[name])["instance_id"]
    started = []
    try:
        assert client.execute(source, MAKE_FILES)["returncode"] == 0
        listing = client.execute(source, LISTING)["output"]
        made = client.snapshot_instance(source, snapshot)
        assert made == {"name": snapshot, "agent_id": made["agent_id"], "type": SPECS[name]["type"], "source": source,
                        "ready": True}
        client.execute(source, "echo later > tree/a/b/f")  # after the snapshot: not in it
        client.close_instance(source)
        source = None
        spec = {**SPECS[name], "snapshot": snapshot}
        for _ in range(2):
            started.append(client.start_instance(spec)["instance_id"])
            assert client.execute(started[-1], LISTING)["output"] == listing
        assert client.available_resources()["snapshots"][snapshot]["ready"] is True
        with pytest.raises(ServiceError) as err:
            client.delete_snapshot(snapshot)
        assert err.value.code == "conflict" and started[0] in err.value.message
        for instance_id in started:
            client.close_instance(instance_id)
        started = []
        assert client.delete_snapshot(snapshot) == {"name": snapshot, "deleted": True}
        with pytest.raises(ServiceError) as err:
            client.start_instance(spec)
        assert err.value.code == "not_found"
    finally:
        for instance_id in [source, *started]:
            if instance_id is not None:
                client.close_instance(instance_id)
    if name == "docker-busybox":
        wait_for(lambda: fork_images(made["source"]) == [], timeout=20, what="the snapshot's image to go")


def test_bad_snapshots_are_refused(service):
    client = service.client
    source = client.start_instance({"type": "local"})["instance_id"]
    try:
        for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "sp ace"):
            with pytest.raises(ServiceError) as err:
                client.snapshot_instance(source, bad)
            assert err.value.code == "invalid_request", bad
        client.snapshot_instance(source, "once")
        with pytest.raises(ServiceError) as err:
            client.snapshot_instance(source, "once")
        assert err.value.code == "conflict"
        for spec, code in (({"type": "bubblewrap", "snapshot": "once"}, "invalid_request"),  # a local instance's
                           ({"type": "local", "snapshot": "never-made"}, "not_found"),
                           ({"type": "apptainer", "image": "docker://x:1", "snapshot": "once"}, "invalid_request")):
            with pytest.raises(ServiceError) as err:
                client.start_instance(spec)
            assert err.value.code == code, (spec, err.value)
        client.delete_snapshot("once")
        with pytest.raises(ServiceError) as err:
            client.delete_snapshot("once")
        assert err.value.code == "not_found"
    finally:
        client.close_instance(source)


@pytest.mark.parametrize("name", params("local", "docker-busybox"))
def test_snapshots_go_with_the_service(name):
    svc = Service("--runner", "local").wait_ready()
    try:
        source = svc.client.start_instance(SPECS[name])["instance_id"]
        svc.client.snapshot_instance(source, "kept")
        [agent] = svc.client.available_resources()["agents"]
        workdir = svc.client.instances()[0]["info"].get("workdir")
    finally:
        assert svc.stop() == 0
    if name == "docker-busybox":
        assert fork_images(source) == []
    else:
        assert not os.path.exists(os.path.dirname(workdir)), agent  # the agent's directory, snapshots and all
