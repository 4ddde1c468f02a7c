"""Chaos (issue 14 part 7): CYCLES start/execute/close cycles from 16 client threads over local,
docker and bubblewrap instances, while a driver SIGKILLs and SIGSTOPs/SIGCONTs agents, restarts
the broker and restarts dockerd.

The broker is `arservice broker` and its agents are started by hand (`arservice agent --broker ...`), so
that they live through a broker restart as a fleet's do. The dockerd restarted is one of the test's own
(its own data root, exec root and socket; agents get DOCKER_HOST): the machine's dockerd serves other
tests meanwhile, whose containers a restart would stop. At the end: no wrong output, every request
answered with a result or a documented error code within its deadline, instances lost only where their
agent died or, for docker ones, their dockerd restarted, and nothing left of this test's agents
(containers, processes, directories). ARSERVICE_CHAOS_SEED replays a run; ARSERVICE_CHAOS_CYCLES sets
how many cycles, ARSERVICE_CHAOS_MAX_S how long they may take.

The driver acts at finished-cycle marks CYCLES_PER_ACTION apart, not every few seconds: a slower
machine then gets as much chaos per cycle as a fast one, rather than more (which slowed it further),
and MAX_S bounds a wedge, not the machine's speed.
"""

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from arservice import client as clients
from arservice import protocol
from arservice.agent.agent import AGENT_MARK
from arservice.client import HTTPClient, ServiceError, ZMQClient
from arservice.environments.docker import LABEL
from arservice.environments.process import marked_processes

from backends import SPECS, missing
from dockerd import Dockerd
from helpers import Service, wait_for

CYCLES = int(os.environ.get("ARSERVICE_CHAOS_CYCLES", "1000"))
MAX_S = float(os.environ.get("ARSERVICE_CHAOS_MAX_S", "300"))
CYCLES_PER_ACTION = (25, 55)  # so about 25 actions in 1,000 cycles, and the seed says which and when
ACTION_GAP_S = 1.0  # the least time from one action's end to the next, so that a slow spell brings no storm
CLIENTS = 16
AGENTS = 3
TOKEN = "chaos"
# Longer than any stop the driver makes (a stalled agent must never be lost), and short: for that long
# after a restart the broker answers `unavailable` for ids it does not know, a dead agent's among them.
AGENT_GRACE_S = 8.0
STOP_S = (0.5, 4.0)
COMMAND_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0  # a start caught by a dockerd restart answers `timeout` within it
# The longest a request may take: its time limit, the client's margin, and its wait for a connection.
REQUEST_DEADLINE_S = COMMAND_TIMEOUT_S + clients.EXECUTE_MARGIN_S + clients.CONNECT_WAIT_S + 2.0
# Codes that say the instance is gone: only right when its agent was killed (or its dockerd restarted).
LOST = {"agent_lost", "instance_lost", "not_found"}

pytestmark = pytest.mark.timeout(MAX_S + 150)


class Fleet:
    """A broker and AGENTS agents started by hand, each agent replaceable and the broker restartable."""

    def __init__(self, workdir_root: str, dockerd: Dockerd | None):
        self.root = workdir_root
        self.dockerd = dockerd
        self.broker = Service("broker", "--agent-timeout", "1", "--agent-grace", str(AGENT_GRACE_S),
                              "--start-wait", "5", token=TOKEN).wait_ready(agents=0)
        self.broker_proc = self.broker.proc
        self.env = dict(os.environ, ARSERVICE_TOKEN=TOKEN, **({"DOCKER_HOST": dockerd.url} if dockerd else {}))
        # The agents' logs, one file for all (lines name their agent): what a leak is read from.
        self.agent_log = tempfile.NamedTemporaryFile(prefix="arservice-chaos-agents-", suffix=".log")
        self.agents: list[subprocess.Popen] = []
        self.ever: list[int] = []  # pids of every agent this test started
        self.killed_pids: set[int] = set()
        for _ in range(AGENTS):
            self.start_agent()

    def start_agent(self) -> subprocess.Popen:
        agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", self.broker.zmq,
                                  "--instances", "8", "--broker-grace", "60", "--workdir-root", self.root],
                                 env=self.env, stdin=subprocess.DEVNULL, stderr=self.agent_log)
        self.agents.append(agent)
        self.ever.append(agent.pid)
        return agent

    def agent_ids(self) -> set[str]:
        """Agent ids (host-pid-…) of every agent this test started: what their marks start with."""
        return {f"{socket.gethostname()}-{pid}-" for pid in self.ever}

    def killed(self, agent: str) -> bool:
        return any(agent.startswith(f"{socket.gethostname()}-{pid}-") for pid in self.killed_pids)

    def restart_broker(self) -> None:
        self.broker_proc.send_signal(signal.SIGTERM)
        self.broker_proc.wait(timeout=30)
        self.broker_proc = subprocess.Popen(self.broker.proc.args, stdout=self.broker.log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGCONT)
                agent.terminate()
        for agent in self.agents:
            try:
                agent.wait(timeout=40)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        self.broker.proc = self.broker_proc
        self.broker.stop()


def leftovers(fleet: Fleet) -> dict:
    """What this test's agents left: containers labelled with them, processes marked with them, directories."""
    prefixes = tuple(fleet.agent_ids())
    containers = []
    if fleet.dockerd is not None:
        import docker
        client = docker.DockerClient(base_url=fleet.dockerd.url, timeout=20)
        try:
            # The low-level list carries the labels: no inspect of a container that may be gone by then.
            # Named by what tells a leak's cause: its agent, its state, and when it was made.
            containers = [f"{c['Id'][:12]} agent={c['Labels'][f'{LABEL}.agent']} {c.get('Status')} created={c.get('Created')}"
                          for c in client.api.containers(all=True, filters={"label": f"{LABEL}=1"})
                          if (c.get("Labels") or {}).get(f"{LABEL}.agent", "").startswith(prefixes)]
        finally:
            client.close()
    processes = [pid for pid, mark in marked_processes(f"{AGENT_MARK}=".encode())
                 if mark.split(b"=", 1)[1].decode(errors="replace").startswith(prefixes)]
    directories = os.listdir(fleet.root)
    return {"containers": containers, "processes": processes, "directories": directories}


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.cycle_finished = threading.Condition(self.lock)
        self.stopped = False
        self.counts = collections.Counter()
        self.codes = collections.Counter()
        self.wrong: list[str] = []
        self.undocumented: list[str] = []
        self.wrongly_lost: list[str] = []
        self.crashes: list[str] = []
        self.slowest = 0.0
        self.agent_of: dict[str, str] = {}  # instance id -> agent id, from the start's answer
        self.cycles = 0  # claimed by the clients, up to CYCLES

    def claim_cycle(self) -> bool:
        with self.lock:
            self.cycles += 1
            return self.cycles <= CYCLES

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def finish_cycle(self) -> None:
        with self.lock:
            self.counts["cycles"] += 1
            self.cycle_finished.notify_all()

    def wait_cycles(self, n: int) -> bool:
        """Wait until n cycles have finished: False if the clients are done first."""
        with self.lock:
            self.cycle_finished.wait_for(lambda: self.stopped or self.counts["cycles"] >= n)
            return not self.stopped

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.cycle_finished.notify_all()


def spec_of(kind: str) -> dict:
    spec = dict(SPECS[kind], start_timeout=START_TIMEOUT_S)
    if spec["type"] == "docker":
        # A dockerd stopping stops each container with its stop signal, SIGTERM, which the helper (PID 1)
        # never heeds, and waits 10 s before SIGKILL: SIGKILL at once keeps a restart to a few seconds.
        spec["run_options"] = {"stop_signal": "SIGKILL"}
    return spec


def run_client(index: int, fleet: Fleet, kinds: list[str], tally: Tally, rng_seed: int, until: float) -> None:
    rng = random.Random(rng_seed)
    client = ZMQClient(fleet.broker.zmq, token=TOKEN) if index % 2 == 0 else HTTPClient(fleet.broker.url, token=TOKEN)

    def call(method, *args, **kwargs):
        started = time.monotonic()
        try:
            return getattr(client, method)(*args, **kwargs), None
        except ServiceError as exc:
            with tally.lock:
                tally.codes[exc.code] += 1
                if exc.code not in protocol.ERROR_CODES:
                    tally.undocumented.append(f"{method}: {exc.code} {exc}")
            return None, exc
        finally:
            elapsed = time.monotonic() - started
            with tally.lock:
                tally.counts["requests"] += 1
                tally.slowest = max(tally.slowest, elapsed)

    def lost_rightly(instance: str, kind: str, dockerd_restarts: int, why: str) -> bool:
        """A lost instance is right only when the agent that held it was killed, or, for a docker one,
        when the test's dockerd restarted since it started."""
        agent = tally.agent_of[instance]
        if fleet.killed(agent):
            return True
        if kind.startswith("docker") and fleet.dockerd.restarts > dockerd_restarts:
            tally.add("docker instances lost with their dockerd")
            return True
        with tally.lock:
            tally.wrongly_lost.append(f"{kind} {instance} on {agent}: {why}")
        return False

    try:
        while tally.claim_cycle() and time.monotonic() < until:
            while time.monotonic() < until:  # a failed start (no room, broker restarting) is tried again
                kind = rng.choice(kinds)
                dockerd_restarts = fleet.dockerd.restarts if fleet.dockerd else 0
                started, exc = call("start_instance", spec_of(kind), wait_s=5)
                if exc is None:
                    break
                time.sleep(0.2)  # not a busy loop
            else:
                break
            instance = started["instance_id"]
            with tally.lock:
                tally.agent_of[instance] = started["agent_id"]
            tally.add(f"started {kind}")
            for _ in range(rng.randint(1, 3)):
                n = rng.randint(1, 10**6)
                result, exc = call("execute", instance, f"echo $(({n}*7))", timeout=COMMAND_TIMEOUT_S)
                if exc is None:
                    if result["output"] == f"{n * 7}\n" and result["returncode"] == 0:
                        tally.add("right outputs")
                    elif result["returncode"] == 137 and result.get("message") and lost_rightly(
                            instance, kind, dockerd_restarts, f"killed from outside: {result!r}"):
                        tally.add("commands killed with their container")
                    else:
                        with tally.lock:
                            tally.wrong.append(f"{kind} {instance}: {n}*7 gave {result!r}")
                elif exc.code in LOST:
                    lost_rightly(instance, kind, dockerd_restarts, f"{exc.code} {exc}")
                    break
            # Close until it is closed or known lost: nothing a client started may be left behind.
            tries = 0
            while True:
                result, exc = call("close_instance", instance)
                tries += 1
                if exc is None:
                    tally.add("closed, lost" if result.get("lost") else "closed")
                    break
                if exc.code == "not_found" and tries > 1:  # an earlier close did it; its answer went with the broker
                    tally.add("closed, answer lost")
                    break
                if exc.code in LOST:
                    if lost_rightly(instance, kind, dockerd_restarts, f"close: {exc.code} {exc}"):
                        tally.add("closed, lost")
                    break
                if time.monotonic() > until + 60:
                    tally.add("not closed")
                    break
                time.sleep(0.2)
            tally.finish_cycle()
    except Exception as exc:  # noqa: BLE001 (a client that crashed did not finish its cycles: the test fails on it)
        with tally.lock:
            tally.crashes.append(repr(exc))
    finally:
        if isinstance(client, ZMQClient):
            client.close()


def drive(fleet: Fleet, rng: random.Random, tally: Tally, events: collections.Counter) -> None:
    """At finished-cycle marks CYCLES_PER_ACTION apart (and ACTION_GAP_S at least), one of: SIGKILL an agent
    (and start a new one), SIGSTOP one for a while, restart the broker, restart dockerd; until the
    clients are done."""
    actions = ["kill", "stop", "stop", "broker", *(["dockerd"] if fleet.dockerd else [])]
    mark, next_action = 0, time.monotonic()
    while tally.wait_cycles(mark := mark + rng.randint(*CYCLES_PER_ACTION)):
        time.sleep(max(0.0, next_action - time.monotonic()))
        if tally.stopped:  # the clients finished meanwhile
            break
        live = [a for a in fleet.agents if a.poll() is None]
        action = rng.choice(actions)
        if action == "kill" and live:
            victim = rng.choice(live)
            fleet.killed_pids.add(victim.pid)  # before the signal: a client may see it lost at once
            victim.kill()
            victim.wait()
            fleet.start_agent()
        elif action == "stop" and live:
            victim = rng.choice(live)
            victim.send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(*STOP_S))
            victim.send_signal(signal.SIGCONT)
        elif action == "broker":
            fleet.restart_broker()
        elif action == "dockerd":
            fleet.dockerd.restart()
        events[action] += 1
        next_action = time.monotonic() + ACTION_GAP_S


def test_chaos():
    seed = int(os.environ.get("ARSERVICE_CHAOS_SEED", random.randrange(1 << 32)))
    print(f"\nchaos seed {seed} (ARSERVICE_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    kinds = [k for k in ("local", "docker-busybox", "bubblewrap") if missing(k) is None]
    if "docker-busybox" in kinds and shutil.which("dockerd") is None:
        kinds.remove("docker-busybox")  # a remote engine: no dockerd of the test's own to restart
    print(f"chaos kinds {kinds}; skipped: {[k for k in ('docker-busybox', 'bubblewrap') if k not in kinds]}")
    began = time.monotonic()
    dockerd = Dockerd(SPECS["docker-busybox"]["image"]) if "docker-busybox" in kinds else None
    root = tempfile.mkdtemp(prefix="arservice-chaos-")
    os.chmod(root, 0o755)  # bubblewrap's unprivileged uid searches it, as an agent's own root
    tally = Tally()
    events = collections.Counter()
    report, orphans = {}, []
    try:
        fleet = Fleet(root, dockerd)
        try:
            wait_for(lambda: len(fleet.broker.client.available_resources()["agents"]) == AGENTS, timeout=30,
                     what="the agents to register")
            started = time.monotonic()
            until = started + MAX_S
            threads = [threading.Thread(target=run_client, args=(i, fleet, kinds, tally, rng.randrange(1 << 32), until))
                       for i in range(CLIENTS)]
            driver = threading.Thread(target=drive, args=(fleet, random.Random(rng.randrange(1 << 32)), tally, events))
            for t in [*threads, driver]:
                t.start()
            for t in threads:
                t.join(timeout=MAX_S + REQUEST_DEADLINE_S + 60)
            report["cycles s"] = round(time.monotonic() - started, 1)
            tally.stop()
            driver.join()
            assert not any(t.is_alive() for t in threads), "a client thread did not finish"
            if dockerd is not None:  # left up and healthy, whatever the driver did last
                wait_for(dockerd.healthy, timeout=60, interval=0.5, what="the test's dockerd to answer `docker info`")
            # Starts whose answer was lost with a restarting broker left instances no client knows (adopted by
            # the new broker): close them.
            wait_for(lambda: len(fleet.broker.client.available_resources()["agents"]) >= AGENTS, timeout=30,
                     what="the agents back")
            orphans = [i["instance_id"] for i in fleet.broker.client.instances() if i["state"] != "lost"]
            for instance in orphans:
                try:
                    fleet.broker.client.close_instance(instance)
                except ServiceError as exc:  # on an agent killed since, or still being declared lost
                    assert exc.code in LOST, exc
        finally:
            tally.stop()  # also where the test failed before its own stop: the driver must not wait for ever
            report.update({"seed": seed, **events, **tally.counts, "orphaned starts closed": len(orphans),
                           "error codes": dict(tally.codes), "wrong outputs": len(tally.wrong),
                           "undocumented codes": len(tally.undocumented), "wrongly lost": len(tally.wrongly_lost),
                           "client crashes": len(tally.crashes), "slowest request s": round(tally.slowest, 1)})
            print(f"chaos counts before the leak check {report}")
            fleet.stop()
        try:
            wait_for(lambda: not any(leftovers(fleet).values()), timeout=60, what="nothing left of this test's agents")
        finally:
            left = leftovers(fleet)
            report["leaked"] = {k: len(v) for k, v in left.items()}
            if any(left.values()):
                print(f"chaos leftovers {left}; agents killed {sorted(fleet.killed_pids)}, "
                      f"agent exits {[(a.pid, a.returncode) for a in fleet.agents]}, stopped at {time.time():.0f}")
                with open(fleet.agent_log.name, errors="replace") as agent_log:
                    print("chaos agents' warnings and errors:", *[line for line in agent_log
                          if " WARNING " in line or " ERROR " in line][-60:], sep="\n")
            report["test s"] = round(time.monotonic() - began, 1)
            print(f"chaos counts {report}")
    finally:
        if dockerd is not None:
            dockerd.remove()
        if not os.listdir(root):  # what is left in it is a leak the assertions name: kept to look at
            os.rmdir(root)
    assert not tally.crashes, tally.crashes[:5]
    assert not tally.wrong, tally.wrong[:5]
    assert not tally.undocumented, tally.undocumented[:5]
    assert not tally.wrongly_lost, tally.wrongly_lost[:5]
    assert tally.slowest <= REQUEST_DEADLINE_S
    assert all(tally.counts[f"started {kind}"] for kind in kinds), tally.counts
    assert sum(events.values()) > 0, "the driver never acted (fewer cycles than CYCLES_PER_ACTION?)"
    assert tally.counts["cycles"] == CYCLES, f"{tally.counts['cycles']} of {CYCLES} cycles within {MAX_S:g}s"
