"""Docker and podman: limits, labels, isolation and cleanup, checked against the engine itself."""

import os
import signal

import docker
import pytest

from arservice.client import ServiceError
from arservice.environments import backend

from backends import BUSYBOX, SPECS, params
from helpers import Service, wait_for

ENGINES = params("docker-busybox", "podman")


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 8}').wait_ready()
    agents = {a["agent_id"] for a in svc.client.available_resources()["agents"]}
    yield svc
    assert svc.stop() == 0
    # Stopping the service removed every container it made, on every engine (its agents' labels:
    # the engine may hold other services' containers).
    for name in ("docker-busybox", "podman"):
        engine = SPECS[name]["type"]
        if backend(engine).available():
            left = [c for c in labelled(engine) if c["Labels"].get("arservice.agent") in agents]
            assert left == [], f"{engine} containers left after the service stopped"


@pytest.fixture(params=ENGINES)
def engine(request):
    """(spec, docker SDK client talking to that engine)."""
    spec = SPECS[request.param]
    client = docker.DockerClient(base_url=backend(spec["type"]).url(), timeout=30)
    yield spec, client
    client.close()


def labelled(engine, instance_id=None):
    client = docker.DockerClient(base_url=backend(engine).url(), timeout=30)
    try:
        labels = ["arservice=1"] + ([f"arservice.instance={instance_id}"] if instance_id else [])
        # One API call (containers.list would inspect each one after, racing the reaper's removal).
        return client.api.containers(all=True, filters={"label": labels})
    finally:
        client.close()


def test_limits_labels_and_network_are_applied(service, engine):
    spec, sdk = engine
    client = service.client
    inst = client.start_instance({**spec, "cpus": 0.5, "memory": "96m", "pids": 40})
    try:
        (container,) = labelled(spec["type"], inst["instance_id"])
        host = sdk.containers.get(container["Id"]).attrs["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 96 << 20
        assert host["PidsLimit"] == 40
        assert host["NetworkMode"] == "none"
        assert container["Labels"]["arservice.agent"] == inst["agent_id"]
        # From inside: only the loopback interface exists.
        interfaces = client.execute(inst["instance_id"], "tail -n +3 /proc/net/dev | cut -d: -f1")["output"].split()
        assert interfaces == ["lo"]
        # No more processes than pids allows.
        forks = client.execute(inst["instance_id"], "for i in $(seq 60); do sleep 30 & done 2>&1; echo forked", timeout=5)
        assert "fork" in forks["output"].lower() or "resource temporarily unavailable" in forks["output"].lower()
    finally:
        client.close_instance(inst["instance_id"])
    assert labelled(spec["type"], inst["instance_id"]) == []


def test_a_container_timeout_with_a_fraction_counts_whole_seconds(service, engine):
    """The backstop sleeps whole seconds: the fraction was cut off (0.5 ended the container at once)
    while the service counted it, and revived a container the backstop had ended."""
    spec, sdk = engine
    client = service.client
    inst = client.start_instance({**spec, "container_timeout": 1.5})["instance_id"]
    try:
        (container,) = labelled(spec["type"], inst)
        assert "(sleep 2;" in " ".join(sdk.containers.get(container["Id"]).attrs["Config"]["Entrypoint"])

        def gone():
            try:
                client.execute(inst, "true")
            except ServiceError as exc:
                return exc.code
            return None
        assert wait_for(gone, timeout=30, interval=0.2, what="the container to end") == "instance_lost"
    finally:
        client.close_instance(inst)


def test_memory_hog_is_killed(service, engine):
    spec, _ = engine
    client = service.client
    inst = client.start_instance({**spec, "memory": 64})
    try:
        result = client.execute(inst["instance_id"], "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null")
        assert result["returncode"] == 137  # SIGKILL from the OOM killer, as the shell reports it
    finally:
        client.close_instance(inst["instance_id"])


def test_timeout_leaves_nothing_running_inside(service, engine):
    spec, _ = engine
    client = service.client
    inst = client.start_instance(spec)
    try:
        result = client.execute(inst["instance_id"], "sleep 600 & (sleep 601 &) ; sleep 602", timeout=1)
        assert result["timed_out"] and result["returncode"] == 137 and result["signal"] == "SIGKILL"
        procs = lambda: client.execute(inst["instance_id"], "cat /proc/[0-9]*/cmdline | tr '\\000' ' '")["output"]
        wait_for(lambda: "sleep 60" not in procs(), timeout=10, what="no sleep left in the container")
    finally:
        client.close_instance(inst["instance_id"])


def test_environment_forwarding_and_network_opt_in(service, engine):
    spec, sdk = engine
    client = service.client
    # PATH is in every agent's environment; the spec's env wins over forwarded names.
    inst = client.start_instance({**spec, "forward_env": ["PATH", "HOME"], "env": {"HOME": "/spec"}, "network": "host"})
    try:
        out = client.execute(inst["instance_id"], 'echo "$PATH|$HOME"')["output"]
        assert out == f"{os.environ['PATH']}|/spec\n"
        (container,) = labelled(spec["type"], inst["instance_id"])
        assert sdk.containers.get(container["Id"]).attrs["HostConfig"]["NetworkMode"] == "host"
    finally:
        client.close_instance(inst["instance_id"])


def test_missing_image_with_pull_never_is_a_clear_error(service, engine):
    spec, _ = engine
    before = service.client.available_resources()["used"]
    with pytest.raises(ServiceError) as err:
        service.client.start_instance({**spec, "image": "local/no-such-image:test"})
    assert err.value.code == "environment_error" and "local/no-such-image:test" in err.value.message
    assert service.client.available_resources()["used"] == before


def test_killed_agent_leaves_no_container_once_restarted(service, engine):
    """SIGKILL skips every cleanup; the agent the runner starts next reaps what it left."""
    spec, _ = engine
    client = service.client
    inst = client.start_instance(spec)
    assert labelled(spec["type"], inst["instance_id"])
    (pid,) = service.agent_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not labelled(spec["type"], inst["instance_id"]), timeout=30, what="the container to be reaped")
    agent_pids = lambda: [a["pid"] for a in client.available_resources()["agents"]]
    wait_for(lambda: len(agent_pids()) == 1 and pid not in agent_pids(), timeout=30, what="only the new agent")
    listed = {i["instance_id"]: i["state"] for i in client.instances()}
    assert listed[inst["instance_id"]] == "lost"


def test_bad_container_fields_are_refused_before_any_start(service):
    client = service.client
    for spec, word in [({"type": "docker"}, "image"),
                       ({"type": "docker", "image": BUSYBOX, "pull": "sometimes"}, "pull"),
                       ({"type": "docker", "image": BUSYBOX, "forward_env": "PATH"}, "forward_env"),
                       ({"type": "docker", "image": BUSYBOX, "memory": "lots"}, "memory"),
                       ({"type": "podman", "image": BUSYBOX, "cpus": -1}, "cpus")]:
        with pytest.raises(ServiceError) as err:
            client.start_instance(spec)
        assert err.value.code == "invalid_request" and word in err.value.message, spec
