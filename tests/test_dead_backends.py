"""Dead is dead on every backend (issue 14 part 4): an instance whose sandbox or container was
killed from outside is `lost` and frees its capacity (or, where its spec asks, is revived).
Real bubblewrap, podman and docker."""

import contextlib
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.client import ServiceError
from arservice.environments import hostdir

from backends import SPECS, params
from dockerd import Dockerd
from helpers import Service, proc_stat, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def svc():
    service = Service("--runner", "local", "--max-resources", '{"instances": 4}').wait_ready()
    yield service
    assert service.stop() == 0


def code_of(call, *args) -> str | None:
    try:
        call(*args)
    except ServiceError as exc:
        return exc.code
    return None


def state(svc, instance_id):
    return {i["instance_id"]: i["state"] for i in svc.client.instances()}.get(instance_id)


def _live_stat(pid: int) -> tuple[str, bytes, int] | None:
    """helpers.proc_stat, None for a zombie too."""
    stat = proc_stat(pid)
    return None if stat is None or stat[1] == b"Z" else stat


def sandbox_processes(workdir: str) -> tuple[list[int], list[int]]:
    """The bwrap processes of the sandbox over `workdir` (the outer one names it in its argv), and
    the processes inside it (its helper, PID 1 of the sandbox)."""
    outer = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"bwrap") and workdir.encode() in argv:
            outer.append(int(pid))
    family, found = set(outer), True
    while found:  # every descendant of the outer bwrap
        found = False
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            stat = _live_stat(pid)
            if stat and stat[2] in family and pid not in family:
                family.add(pid)
                found = True
    inside = [pid for pid in family if (_live_stat(pid) or ("bwrap",))[0] != "bwrap"]
    return outer, inside


@pytest.mark.parametrize("name", params("bubblewrap"))
@pytest.mark.parametrize("victim", ["sandbox", "helper"])
def test_a_bubblewrap_sandbox_killed_from_outside_is_lost_unless_revive_is_asked(svc, name, victim):
    """Before, the next command ran in a new sandbox whatever the spec said: /tmp and the
    instance's processes were gone, and nothing told the client."""
    lost, kept = (svc.client.start_instance(dict(SPECS[name], **extra)) for extra in ({}, {"revive": True}))
    used = svc.client.available_resources()["used"]["instances"]
    for inst in (lost, kept):
        svc.client.execute(inst["instance_id"], "echo tmp > /tmp/t; echo work > /work/w")
        outer, inside = sandbox_processes(inst["info"]["workdir"])
        assert outer and inside
        for pid in outer if victim == "sandbox" else inside:
            with contextlib.suppress(ProcessLookupError):  # gone with one killed before it
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda inst=inst: sandbox_processes(inst["info"]["workdir"]) == ([], []), timeout=10,
                 what="the sandbox to die")
    assert code_of(svc.client.execute, lost["instance_id"], "true") == "instance_lost"
    assert state(svc, lost["instance_id"]) == "lost"
    assert svc.client.available_resources()["used"]["instances"] == used - 1
    wait_for(lambda: not os.path.exists(lost["info"]["workdir"]), timeout=10, what="the lost instance removed")
    assert svc.client.close_instance(lost["instance_id"])["lost"] is True
    # Asked for: a new sandbox over the same /work; /tmp is new.
    result = svc.client.execute(kept["instance_id"], "cat /work/w; ls -A /tmp | wc -l")
    assert result["output"].split() == ["work", "0"]
    svc.client.close_instance(kept["instance_id"])


@pytest.mark.parametrize("name", params("podman"))
def test_a_podman_container_removed_from_outside_is_lost_and_frees_its_capacity(svc, name):
    inst = svc.client.start_instance(SPECS[name])
    instance_id = inst["instance_id"]
    used = svc.client.available_resources()["used"]["instances"]
    assert svc.client.execute(instance_id, "echo up")["output"] == "up\n"
    subprocess.run(["podman", "rm", "-f", "-t", "0", inst["info"]["container_id"]], check=True, timeout=60,
                   stdout=subprocess.DEVNULL)
    assert code_of(svc.client.execute, instance_id, "true") == "instance_lost"
    assert state(svc, instance_id) == "lost"
    assert svc.client.available_resources()["used"]["instances"] == used - 1
    assert code_of(svc.client.execute, instance_id, "true") == "agent_lost"
    assert svc.client.close_instance(instance_id)["lost"] is True


class PodmanService:
    """A podman API service of this test's own on a private socket: restarting it touches nobody
    else's (podman runs no daemon: containers outlive the service that started them)."""

    CONF = os.path.join(os.environ.get("ARSERVICE_CACHE", "/var/cache/arservice"), "podman-containers.conf")

    def __init__(self, socket_path: str):
        self.url = f"unix://{socket_path}"
        self.path = socket_path
        self.proc = None

    def start(self) -> None:
        env = dict(os.environ, CONTAINERS_CONF=self.CONF) if os.path.exists(self.CONF) else None
        self.proc = subprocess.Popen(["podman", "system", "service", "--time=0", self.url], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["curl", "-sf", "-m", "5", "--unix-socket", self.path, "http://d/_ping"],
                                        check=False, capture_output=True).returncode == 0, timeout=30, what="podman's API up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.mark.parametrize("name", params("podman"))
def test_a_podman_service_restart_keeps_running_instances(name, tmp_path):
    """Podman's API service restarted under a running instance: the container runs on (conmon holds
    it), so the instance stays running and usable, and its close, once the service is back,
    removes the container."""
    service = PodmanService(str(tmp_path / "podman.sock"))
    service.start()
    svc = Service("--runner", "local", env={"CONTAINER_HOST": service.url}).wait_ready()
    try:
        inst = svc.client.start_instance(SPECS[name])
        instance_id, container = inst["instance_id"], inst["info"]["container_id"]
        svc.client.write_file(instance_id, "/root/kept", "kept")
        service.stop()
        assert svc.client.execute(instance_id, "cat /root/kept")["output"] == "kept"  # the helper needs no API
        assert code_of(svc.client.start_instance, SPECS[name]) == "environment_error"  # a start does
        service.start()
        assert svc.client.execute(instance_id, "cat /root/kept; echo")["output"] == "kept\n"
        assert svc.client.read_file(instance_id, "/root/kept") == b"kept"
        assert state(svc, instance_id) == "running"
        svc.client.close_instance(instance_id)
        gone = subprocess.run(["podman", "container", "exists", container], check=False, timeout=60)
        assert gone.returncode == 1
    finally:
        assert svc.stop() == 0
        service.stop()


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_a_docker_close_while_dockerd_restarts_removes_the_container(name, tmp_path, monkeypatch, caplog):
    """Before, a close while dockerd was down failed at once and the container stayed for good
    (the agent forgets a closed instance). The backend against a dockerd of the test's own."""
    if shutil.which("dockerd") is None:
        pytest.skip("no dockerd here to start one of the test's own (a remote engine)")
    from arservice.environments.docker import DockerEnvironment
    dockerd = Dockerd(SPECS[name]["image"])
    try:
        monkeypatch.setenv("DOCKER_HOST", dockerd.url)
        config = DockerEnvironment.parse_config(dict(SPECS[name], run_options={"stop_signal": "SIGKILL"}))
        env = DockerEnvironment(f"i-close-{os.getpid()}", config, "test-agent", str(tmp_path))
        container = env.start()["container_id"]
        dockerd.stop()
        with ThreadPoolExecutor(1) as pool:
            closing = pool.submit(env.close)
            wait_for(lambda: "remove_retried" in caplog.text or closing.done(), timeout=10, what="a removal tried")
            assert not closing.done()  # it did not give up with dockerd down
            dockerd.start()
            closing.result(timeout=60)
        listed = subprocess.run(["docker", "-H", dockerd.url, "ps", "-aq", "--no-trunc"], capture_output=True,
                                text=True, check=True, timeout=30).stdout.split()
        assert container not in listed
        assert os.listdir(tmp_path) == []
    finally:
        dockerd.remove()
        hostdir.unmount_under(str(tmp_path))  # what a close that failed left mounted
