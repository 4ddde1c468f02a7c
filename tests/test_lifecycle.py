"""Agents dying, the service stopping or crashing: nothing lost, nothing left behind."""

import asyncio
import ctypes
import glob
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice import protocol
from arservice.agent.workdirs import DEFAULT_ROOT
from arservice.aio import AsyncZMQClient
from arservice.client import HTTPClient, ServiceError, ZMQClient

from helpers import PlayedBroker, Service, alive, live_processes, parent, proc_stat, proc_status, wait_for

pytestmark = pytest.mark.timeout(90)


def agent_dirs(pids):
    return [d for pid in pids for d in glob.glob(f"{DEFAULT_ROOT}/*-{pid}-*")]


def test_killed_agent_loses_its_instances_and_frees_capacity():
    svc = Service("--runner", "local", "--max-resources", '{"instances": 2}', "--agent-timeout", "1").wait_ready()
    try:
        [pid] = svc.agent_pids()
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        assert svc.client.available_resources()["used"]["instances"] == 1
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: svc.client.available_resources()["instances"]["lost"] == 1, timeout=10, what="the instance to be lost")
        resources = svc.client.available_resources()
        assert resources["used"]["instances"] == 0
        with pytest.raises(ServiceError) as err:
            svc.client.execute(inst, "true")
        assert err.value.code == "agent_lost"
        with pytest.raises(ServiceError) as err:
            svc.http.execute(inst, "true")
        assert err.value.code == "agent_lost"
        # The runner replaces the agent; its capacity comes back, and the new agent reaps the old one's directory.
        wait_for(lambda: [a for a in svc.client.available_resources()["agents"] if a["pid"] != pid], timeout=20, what="a new agent")
        wait_for(lambda: not agent_dirs([pid]), timeout=10, what="the dead agent's directory to be reaped")
        assert svc.client.close_instance(inst) == {"instance_id": inst, "closed": True, "lost": True}
        fresh = svc.client.start_instance({"type": "local"})["instance_id"]
        assert svc.client.execute(fresh, "echo back")["output"] == "back\n"
        svc.client.close_instance(fresh)
    finally:
        assert svc.stop() == 0


def test_in_flight_request_fails_fast_when_agent_dies():
    svc = Service("--runner", "local", "--agent-timeout", "1").wait_ready()
    try:
        [pid] = svc.agent_pids()
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(svc.client.execute, inst, "sleep 60", timeout=60)
            wait_for(lambda: live_processes("sleep 60"), timeout=10, what="the command to start")
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ServiceError) as err:
                running.result(timeout=20)  # far sooner than the command's 60 s
            assert err.value.code == "agent_lost"
    finally:
        assert svc.stop() == 0


def test_long_command_keeps_agent_alive():
    """A command longer than the agent timeout must not starve the heartbeat."""
    svc = Service("--runner", "local", "--agent-timeout", "1").wait_ready()
    try:
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        assert svc.client.execute(inst, "sleep 3; echo done")["output"] == "done\n"
        assert svc.client.available_resources()["instances"]["lost"] == 0
        svc.client.close_instance(inst)
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_service_leaves_nothing_behind(sig):
    svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 4}').wait_ready(agents=2)
    pids = svc.agent_pids()
    marker = f"arservice-stop-marker-{os.getpid()}-{sig}"
    dirs = []
    for _ in range(3):
        inst = svc.client.start_instance({"type": "local"})
        dirs.append(inst["info"]["workdir"])
        svc.client.execute(inst["instance_id"], f"(exec -a {marker} sleep 300) >/dev/null 2>&1 &")
    # The command returns once its shell exits; the background subshell may not have exec'd yet.
    wait_for(lambda: len(live_processes(marker)) == 3, timeout=10, what="the 3 background processes to start")
    assert svc.stop(sig) == 0
    assert not [p for p in pids if alive(p)]
    assert not [d for d in dirs if os.path.exists(d)]
    assert not agent_dirs(pids)
    wait_for(lambda: not live_processes(marker), timeout=5, what="instance processes to die")


def test_crashed_service_agents_clean_up_by_themselves():
    svc = Service("--runner", "local").wait_ready()
    [pid] = svc.agent_pids()
    inst = svc.client.start_instance({"type": "local"})
    workdir = inst["info"]["workdir"]
    svc.proc.kill()  # SIGKILL: the service gets no chance to stop its agents
    svc.proc.wait()
    wait_for(lambda: not alive(pid), timeout=40, what="the orphaned agent to notice the broker is gone and exit")
    assert not os.path.exists(workdir)
    svc.stop()


def _signal_another_thread(pid, sig):
    """Send `sig` to a thread of process `pid` other than its main one, and one that does not block
    it (ZeroMQ's threads block every signal): where the kernel may deliver a signal to the process."""
    def taker():
        for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid):
            try:
                if not int(proc_status(tid, "SigBlk"), 16) & (1 << (sig - 1)):
                    return tid
            except OSError:
                pass  # a thread that has just ended
        return None
    tid = wait_for(taker, timeout=10, what=f"a thread of {pid} besides the main one that takes signal {sig}")
    assert ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, sig) == 0, os.strerror(ctypes.get_errno())


def test_a_signal_caught_by_another_thread_stops_the_service_and_its_http_workers():
    """A SIGTERM handed to a thread other than the main one still stops the service and an HTTP
    worker. Their main threads waited untimed, so CPython never ran the handler (a service under
    load did not stop within 40 s)."""
    svc = Service("--runner", "local", "--http-workers", "1").wait_ready()
    try:
        [worker] = [pid for pid in live_processes("arservice.http.workers") if parent(pid) == svc.proc.pid]
        assert svc.http.ping()["pong"]  # answered by the worker: it serves, its handler is set
        _signal_another_thread(worker, signal.SIGTERM)
        wait_for(lambda: not alive(worker), timeout=10, what="the HTTP worker to stop")
        _signal_another_thread(svc.proc.pid, signal.SIGTERM)
        assert svc.proc.wait(timeout=30) == 0
    finally:
        svc.stop()


def _state(pid):
    """The process's state letter (b"T" stopped), None once it is gone."""
    stat = proc_stat(pid)
    return None if stat is None else stat[1]


def test_agent_with_wrong_secret_is_refused():
    svc = Service("--runner", "local", token="s3cret").wait_ready()
    try:
        env = dict(os.environ, ARSERVICE_TOKEN="wrong")
        proc = subprocess.run([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq],
                              env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 3
        assert "wrong agent secret" in proc.stderr
        assert len(svc.client.available_resources()["agents"]) == 1
    finally:
        assert svc.stop() == 0


def test_token_guards_every_endpoint_but_health():
    svc = Service("--runner", "local", token="s3cret").wait_ready()
    try:
        for anonymous in (HTTPClient(svc.url, token=""), ZMQClient(svc.zmq, token="")):
            with pytest.raises(ServiceError) as err:
                anonymous.start_instance({"type": "local"})
            assert err.value.code == "unauthorized"
        wrong = HTTPClient(svc.url, token="guess")
        with pytest.raises(ServiceError) as err:
            wrong.available_resources()
        assert err.value.code == "unauthorized"
        assert HTTPClient(svc.url, token="").ping()["status"] == "ok"
        inst = svc.http.start_instance({"type": "local"})["instance_id"]
        assert svc.http.execute(inst, "echo ok")["output"] == "ok\n"
        svc.http.close_instance(inst)
    finally:
        assert svc.stop() == 0


def test_agent_survives_bad_messages_from_its_broker():
    """A real agent process against a ROUTER played by the test: garbage in, error replies out."""
    broker = PlayedBroker()
    answer_to = broker.answer_to
    try:
        broker.send(b"\x00\xffnot msgpack")  # no id to answer to: logged and dropped
        bad = answer_to(protocol.encode(protocol.request("execute", "x1", instance_id="i-none", command="true", timeout=5,
                                                         output_limit=1000)))
        assert bad["type"] == "error" and bad["error"]["code"] == "not_found" and bad["id"] == "x1"
        # A broker fills in every default: an execute without output_limit is not one a broker sends.
        bad = answer_to(protocol.encode(protocol.request("execute", "x1b", instance_id="i-none", command="true", timeout=5)))
        assert bad["error"]["code"] == "invalid_request" and "output_limit" in bad["error"]["message"]
        bad = answer_to(protocol.encode(protocol.request("start_instance", "x2", instance_id="i-1", environment={"type": "nope"})))
        assert bad["error"]["code"] == "invalid_request"
        bad = answer_to(protocol.encode(protocol.request("bogus", "x3")))
        assert bad["error"]["code"] == "invalid_request" and bad["id"] == "x3"
        bad = answer_to(protocol.encode(protocol.request("start_instance", "x4", environment={"type": "local"})))
        assert bad["error"]["code"] == "invalid_request" and "instance_id" in bad["error"]["message"]
        ok = answer_to(protocol.encode(protocol.request("start_instance", "x5", instance_id="i-1", environment={"type": "local"})))
        assert ok["type"] == "reply" and ok["id"] == "x5"
        ok = answer_to(protocol.encode(protocol.request("execute", "x6", instance_id="i-1", command="echo alive", timeout=5,
                                                        output_limit=1000)))  # as a broker fills it in
        assert ok["result"]["output"] == b"alive\n"
        assert broker.agent.poll() is None
    finally:
        assert broker.close() == 0


def test_restart_backoff_resets_after_a_healthy_agent():
    """Before, the backoff only grew: after a few crashes, hours apart, there was no agent for 30 s."""
    from arservice.runners.local import HEALTHY_S
    svc = Service("--runner", "local").wait_ready()
    try:
        def agent_other_than(pid):
            return next((a for a in svc.client.available_resources()["agents"] if a["pid"] != pid), None)

        dead = None
        for crash in (1, 2):
            pid = wait_for(lambda dead=dead: agent_other_than(dead), timeout=20, what="an agent")["pid"]
            if crash == 2:  # the replacement has been healthy for a while
                wait_for(lambda dead=dead: (agent_other_than(dead) or {}).get("registered_s", 0) >= HEALTHY_S + 1,
                         timeout=HEALTHY_S + 20, what="a healthy agent")
            os.kill(pid, signal.SIGKILL)
            dead = pid
            wait_for(lambda crash=crash: svc.output().count("agent_died") == crash, timeout=10, what="the runner to see the death")
        wait_for(lambda: agent_other_than(dead), timeout=20, what="the last replacement")
        restarts = [line for line in svc.output().splitlines() if "agent_died" in line]
        assert all("restart_in_s=0.5" in line for line in restarts), restarts
    finally:
        assert svc.stop() == 0


def _instance_state(svc, instance_id):
    return {i["instance_id"]: i["state"] for i in svc.client.instances()}.get(instance_id)


def test_a_stopped_agent_keeps_its_instances():
    """SIGSTOP is a stall, not a death: requests fail fast as `unreachable`, and after SIGCONT all is as it was."""
    svc = Service("--runner", "local", "--agent-timeout", "1", "--agent-grace", "60").wait_ready()
    try:
        [pid] = svc.agent_pids()
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        svc.client.write_file(inst, "kept.txt", "still here")
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: _instance_state(svc, inst) == "unreachable", timeout=10, what="the instance unreachable")
            for client in (svc.client, svc.http):
                with pytest.raises(ServiceError) as err:
                    client.execute(inst, "true")
                assert err.value.code == "unreachable"
            assert svc.client.available_resources()["used"]["instances"] == 1  # still held: it may come back
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: _instance_state(svc, inst) == "running", timeout=10, what="the instance back")
        assert svc.client.execute(inst, "cat kept.txt")["output"] == "still here"
        assert svc.agent_pids() == [pid]
        assert "agent_back" in svc.output() and "agent_lost" not in svc.output()
        svc.client.close_instance(inst)
    finally:
        assert svc.stop() == 0


def test_a_stall_past_the_grace_loses_the_agent_and_a_dead_one_is_lost_at_once():
    svc = Service("--runner", "local", "--agents", "2", "--agent-timeout", "1", "--agent-grace", "1").wait_ready(agents=2)
    try:
        stalled, killed = svc.agent_pids()
        by_agent = {}
        while len(by_agent) < 2:
            started = svc.client.start_instance({"type": "local"})
            agent_pid = {a["agent_id"]: a["pid"] for a in svc.client.available_resources()["agents"]}[started["agent_id"]]
            by_agent.setdefault(agent_pid, started["instance_id"])
        svc.client.execute(by_agent[stalled], "nohup sleep 301 >/dev/null 2>&1 &")
        # A process that died closes its connection: lost at once, however long the grace.
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: _instance_state(svc, by_agent[killed]) == "lost", timeout=3, what="the dead agent's instance lost")
        os.kill(stalled, signal.SIGSTOP)
        try:
            wait_for(lambda: _instance_state(svc, by_agent[stalled]) == "lost", timeout=10, what="the stalled one lost")
        finally:
            os.kill(stalled, signal.SIGCONT)
        # Back after its grace, the agent learns it was lost, closes what it held and registers again.
        wait_for(lambda: any(a["pid"] == stalled for a in svc.client.available_resources()["agents"]), timeout=15,
                 what="the stalled agent registered again")
        wait_for(lambda: not live_processes("sleep 301"), timeout=10, what="the lost instance's processes to end")
        with pytest.raises(ServiceError) as err:
            svc.client.execute(by_agent[stalled], "true")
        assert err.value.code == "agent_lost"
    finally:
        assert svc.stop() == 0


def _fails_as_unavailable(call, *args, **kwargs):
    """How long `call` took to fail with `unavailable` (any other outcome fails the test)."""
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        call(*args, **kwargs)
    assert err.value.code == "unavailable", err.value
    return time.monotonic() - started


# In the core suites run beside the full suite in CI, the ping to the SIGSTOPped service was
# answered in 2 of 3 runs, and once in the daemon tests beside four core suites (never alone;
# cause not found). It runs with the daemon tests only until that is understood.
@pytest.mark.daemon
def test_clients_fail_fast_when_the_service_stalls_or_dies():
    svc = Service("--runner", "local").wait_ready()
    [agent] = svc.agent_pids()
    try:
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        with ThreadPoolExecutor(4) as pool:
            stalled = pool.submit(_fails_as_unavailable, svc.client.execute, inst, "sleep 50", timeout=60)
            wait_for(lambda: live_processes("sleep 50"), timeout=10, what="the command to start")
            svc.proc.send_signal(signal.SIGSTOP)  # the broker stops answering, its connections stay open
            wait_for(lambda: _state(svc.proc.pid) == b"T", timeout=5, what="the service to stop")
            try:
                try:
                    assert _fails_as_unavailable(ZMQClient(svc.zmq).ping) < 10
                except BaseException:
                    # Seen twice under load, cause unknown: was the service woken, or the answer another's?
                    print(f"the service's state after the ping: {_state(svc.proc.pid)!r}; its log ends:\n{svc.output()[-4000:]}")
                    raise
                assert stalled.result(timeout=20) < 15  # ZMTP heartbeats: not the command's 60 + 30 s
            finally:
                svc.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: svc.client.ping()["pong"], timeout=10, what="the service back")

            async def async_execute():
                client = AsyncZMQClient(svc.zmq)
                try:
                    return await client.execute(inst, "sleep 51", timeout=60)
                finally:
                    await client.aclose()
            in_flight = [pool.submit(_fails_as_unavailable, svc.client.execute, inst, "sleep 52", timeout=60),
                         pool.submit(_fails_as_unavailable, svc.http.execute, inst, "sleep 53", timeout=60),
                         pool.submit(_fails_as_unavailable, asyncio.run, async_execute())]
            wait_for(lambda: len(live_processes("sleep 5")) >= 3, timeout=10, what="the commands to start")
            svc.proc.kill()
            svc.proc.wait()
            assert all(f.result(timeout=20) < 10 for f in in_flight)
        assert _fails_as_unavailable(svc.http.ping) < 5
        assert _fails_as_unavailable(svc.client.ping) < 10
        wait_for(lambda: not alive(agent), timeout=40, what="the orphaned agent to exit")
    finally:
        svc.stop()


def test_a_broker_restart_loses_nothing():
    """`arservice broker` restarted on the same ports mid-rollout: the agent started by hand keeps its
    instance, the new broker adopts it with the same id, and the rollout goes on."""
    broker = Service("broker", token="s3cret").wait_ready(agents=0)
    env = dict(os.environ, ARSERVICE_TOKEN="s3cret")
    agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", broker.zmq, "--instances", "2",
                              "--broker-grace", "60"], env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    restarted = None
    try:
        wait_for(lambda: broker.client.available_resources()["agents"], timeout=30, what="the agent to register")
        inst = broker.client.start_instance({"type": "local"})["instance_id"]
        broker.client.write_file(inst, "kept.txt", "kept")
        outputs, errors = [], []

        def rollout():
            client = ZMQClient(broker.zmq, token="s3cret")
            for step in range(40):
                while True:  # a command lost with the broker is the caller's to send again
                    try:
                        outputs.append(client.execute(inst, f"echo {step} >> steps; tail -1 steps")["output"])
                        break
                    except ServiceError as exc:
                        errors.append(exc.code)
                        if exc.code != "unavailable":
                            return
            client.close()

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(rollout)
            wait_for(lambda: len(outputs) >= 5, timeout=20, what="the rollout to start")
            broker.proc.send_signal(signal.SIGTERM)
            broker.proc.wait(timeout=30)
            restarted = subprocess.Popen(broker.proc.args, stdout=broker.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

            async def read_back():  # sent before the agent is back: the client sends it again until it is
                async with AsyncZMQClient(broker.zmq, token="s3cret") as client:
                    return await client.read_file(inst, "kept.txt")
            assert asyncio.run(read_back()) == b"kept"
            running.result(timeout=60)
        assert set(errors) <= {"unavailable"}, errors
        assert [o for o in outputs if o.strip().isdigit()] == outputs
        lines = broker.client.read_file(inst, "steps").decode().split()
        assert lines[-1] == "39" and sorted(set(map(int, lines))) == list(range(40))  # a retried step may repeat
        assert broker.client.read_file(inst, "kept.txt") == b"kept"
        assert "instance_adopted" in broker.output()
        [adopted] = broker.client.instances()
        assert adopted["instance_id"] == inst and adopted["state"] == "running"
        assert broker.client.available_resources()["used"]["instances"] == 1
        assert broker.client.close_instance(inst)["closed"]
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=30)
        broker.stop()


def test_processes_of_a_killed_agent_do_not_outlive_it():
    svc = Service("--runner", "local").wait_ready()
    try:
        [pid] = svc.agent_pids()
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        svc.client.execute(inst, "nohup sleep 304 >/dev/null 2>&1 &")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(svc.client.execute, inst, "sleep 305", timeout=60)
            wait_for(lambda: live_processes("sleep 304") and live_processes("sleep 305"), timeout=10,
                     what="the commands to start")
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ServiceError):
                in_flight.result(timeout=30)
        # The runner's next agent kills what the dead one left, as its first act; so may any other
        # agent starting on this host meanwhile (CI runs several suites at once), so the test asks
        # only that they are gone, not who logged it.
        wait_for(lambda: not live_processes("sleep 304") and not live_processes("sleep 305"), timeout=20,
                 what="the dead agent's processes to be killed")
    finally:
        assert svc.stop() == 0


def test_an_http_start_may_wait_for_room():
    """A start's `wait_s` over HTTP (the chaos test's HTTP clients got 500: it collided with the wait
    the front end gives the broker)."""
    svc = Service("--runner", "local", "--max-resources", '{"instances": 1}').wait_ready()
    try:
        held = svc.http.start_instance({"type": "local"}, wait_s=5)["instance_id"]
        started = time.monotonic()
        with pytest.raises(ServiceError) as err:
            svc.http.start_instance({"type": "local"}, wait_s=1)
        assert err.value.code == "no_capacity" and time.monotonic() - started >= 0.9
        svc.http.close_instance(held)
    finally:
        assert svc.stop() == 0
