"""fork_instance: new instances whose files are copies of a running instance's, on its agent."""

import docker
import pytest
from backends import SPECS, params
from helpers import Service

from arservice.client import ServiceError
from arservice.environments import backend
from arservice.protocol import ProtocolError

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
        return client.images.list(filters={"label": f"arservice.fork_of={source_id}"})
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
    with pytest.raises(ProtocolError) as err:
        env.fork([])
    assert err.value.code == "invalid_request" and "cannot be forked" in err.value.message
