"""The container reaper an agent runs at start (and again as it stops): labelled containers that provably have no live
owner go, whatever labels they lack; those of live owners stay (issue 14, leak 1). Real docker."""

import os
import socket
import subprocess
import sys

import pytest

from arservice.agent import workdirs
from arservice.environments.docker import LABEL, DockerEnvironment

from backends import BUSYBOX, missing
from helpers import wait_for

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(bool(missing("docker-busybox")), reason=str(missing("docker-busybox")))]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_labelled_containers_without_a_live_owner_are_reaped_and_no_other():
    """Before, the reaper looked only at containers with host and pid labels: one labelled
    arservice=1 alone, or with only its agent id, was never removed."""
    import docker
    client = docker.from_env(timeout=30)
    host, mark = socket.gethostname(), f"reaper-test-{os.getpid()}"
    dead_agent = f"{host}-{dead_pid()}-abcd"
    live_agent = f"{host}-{os.getpid()}-abcd"

    def make(run: bool, **labels: str) -> str:
        container = client.containers.create(BUSYBOX, ["sleep", "300"] if run else ["true"], network_mode="none",
                                             labels={LABEL: "1", f"{LABEL}.test": mark, **labels})
        container.start()
        if not run:
            container.wait(timeout=30)
        return container.id

    made = {
        "no owner label, exited": make(False),
        "agent id of a dead agent only, running": make(True, **{f"{LABEL}.agent": dead_agent}),
        "pid of a dead process, no host label": make(True, **{f"{LABEL}.agent": dead_agent,
                                                              f"{LABEL}.pid": str(dead_pid())}),
        "no owner label, running": make(True),  # may be in a live process's hands: it stays
        "agent id of a live agent": make(False, **{f"{LABEL}.agent": live_agent}),
        "live owner on another host": make(False, **{f"{LABEL}.host": "elsewhere", f"{LABEL}.pid": "1"}),
    }
    try:
        reaped = set(DockerEnvironment.reap(host, workdirs.alive))
        left = {c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL}.test={mark}"})}
        assert {what for what, cid in made.items() if cid in reaped} == {
            "no owner label, exited", "agent id of a dead agent only, running", "pid of a dead process, no host label"}
        assert left == set(made.values()) - reaped
    finally:
        for cid in made.values():
            try:
                client.api.remove_container(cid, force=True)
            except docker.errors.NotFound:
                pass
        client.close()


def test_an_agent_that_stops_reaps_what_dead_agents_left_since_it_started(tmp_path):
    """A container a dead agent's engine made after the next agent's reap at start (its create was
    under way as the agent was SIGKILLed) was left for good once that agent stopped too (the chaos
    test's last CI run: 3 containers). An agent reaps once more as it stops."""
    import docker
    client = docker.from_env(timeout=30)
    mark = f"reaper-test-{os.getpid()}"
    dead = dead_pid()

    def dead_agents_container() -> str:
        return client.containers.create(BUSYBOX, ["true"], network_mode="none", labels={
            LABEL: "1", f"{LABEL}.test": mark, f"{LABEL}.agent": f"{socket.gethostname()}-{dead}-abcd",
            f"{LABEL}.host": socket.gethostname(), f"{LABEL}.pid": str(dead)}).id

    def exists(container_id: str) -> bool:
        return bool(client.api.containers(all=True, filters={"id": container_id}))

    before = dead_agents_container()
    agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", "tcp://127.0.0.1:9",
                              "--types", "docker", "--workdir-root", str(tmp_path)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not exists(before), timeout=30, what="the agent's reap at start")
        after = dead_agents_container()
        agent.terminate()
        assert agent.wait(timeout=40) == 0
        assert not exists(after)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        for container in client.api.containers(all=True, filters={"label": f"{LABEL}.test={mark}"}):
            client.api.remove_container(container["Id"], force=True)
        client.close()
