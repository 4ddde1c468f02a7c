"""A broker restarted under live agents: what it answers before they are back, and the starts
that were in flight (issue 14 part 2)."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice import protocol
from arservice.client import ServiceError

from helpers import PlayedAgent, Service, secret_file, wait_for

pytestmark = pytest.mark.timeout(60)


def restart(broker: Service) -> subprocess.Popen:
    """Stop the broker and start it again on the same ports; the new process (broker.proc is the old one)."""
    broker.proc.send_signal(signal.SIGTERM)
    broker.proc.wait(timeout=30)
    return subprocess.Popen(broker.proc.args, stdout=broker.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_restarted(broker: Service, restarted: subprocess.Popen | None) -> None:
    if restarted is not None:
        restarted.terminate()
        restarted.wait(timeout=30)
    broker.stop()


def code_of(call, *args, **kwargs) -> str | None:
    try:
        call(*args, **kwargs)
    except ServiceError as exc:
        return exc.code
    return None


def test_a_restarted_broker_says_unavailable_until_its_grace_ends_then_not_found(tmp_path):
    """Before, an instance whose agent had not re-registered yet was `not_found` once --agent-timeout
    had passed since the restart: a client gave up on an instance that came back a moment later."""
    secret = secret_file(tmp_path)
    broker = Service("broker", "--agent-timeout", "1", "--agent-grace", "8", "--agent-secret-file", secret).wait_ready(agents=0)
    agents = [subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", broker.zmq, "--instances", "1",
                                "--agent-secret-file", secret,
                                "--broker-grace", "60", "--workdir-root", str(tmp_path)], stdin=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for _ in range(2)]
    restarted = None
    try:
        wait_for(lambda: len(broker.client.available_resources()["agents"]) == 2, timeout=30, what="the agents")
        back, late = (broker.client.start_instance({"type": "local"}) for _ in range(2))
        pids = {a["agent_id"]: a["pid"] for a in broker.client.available_resources()["agents"]}
        for agent in agents:
            os.kill(agent.pid, signal.SIGSTOP)
        restarted = restart(broker)
        started = time.monotonic()
        wait_for(lambda: broker.client.ping()["pong"], timeout=20, what="the broker back")

        def asked(instance_id: str) -> str | None:  # the client sends `unavailable` again for 1 s, then says it
            return code_of(broker.client.request, protocol.EXECUTE, wait_s=1.0, instance_id=instance_id,
                           command="true", timeout=5)
        wait_for(lambda: time.monotonic() - started > 1.5, what="the old rejoin window (--agent-timeout) to pass")
        for instance_id in (back["instance_id"], late["instance_id"], "i-000000000000"):
            assert asked(instance_id) == "unavailable", instance_id
        os.kill(pids[back["agent_id"]], signal.SIGCONT)
        assert broker.client.execute(back["instance_id"], "echo kept")["output"] == "kept\n"
        # After --agent-timeout + --agent-grace an id nobody brought back is not_found, and an agent
        # back later adopts nothing: it closes what it held.
        wait_for(lambda: asked("i-000000000000") == "not_found", timeout=15, what="the grace to end")
        assert time.monotonic() - started >= 8.5
        assert asked(late["instance_id"]) == "not_found"
        os.kill(pids[late["agent_id"]], signal.SIGCONT)
        wait_for(lambda: len(broker.client.available_resources()["agents"]) == 2, timeout=20, what="the late agent")
        wait_for(lambda: not os.path.exists(late["info"]["workdir"]), timeout=10, what="its instance closed")
        assert asked(late["instance_id"]) == "not_found"
        assert [i["instance_id"] for i in broker.client.instances()] == [back["instance_id"]]
        broker.client.close_instance(back["instance_id"])
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGCONT)
            agent.terminate()
            agent.wait(timeout=30)
        stop_restarted(broker, restarted)


def test_a_start_answered_to_a_restarted_broker_is_closed_not_leaked(tmp_path):
    """Before, the restarted broker dropped the answer of a start sent by the broker before it: the
    instance ran on, unknown to the broker and to every client, holding the agent's room."""
    broker = Service("broker", "--agent-secret-file", secret_file(tmp_path)).wait_ready(agents=0)
    agent = PlayedAgent(broker.zmq)
    restarted = None
    try:
        agent.register()
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(code_of, broker.client.start_instance, {"type": "local"})
            forwarded = agent.receive(lambda m: m["type"] == protocol.START_INSTANCE)
            restarted = restart(broker)
            assert start.result(timeout=20) == "unavailable"  # the start's client lost its broker
        # The played agent finds the new broker (its heartbeat is refused), registers holding nothing
        # (the start has not finished), and then answers the start.
        agent.send(protocol.request(protocol.HEARTBEAT, "h", instances=0))
        agent.receive(lambda m: m["type"] == protocol.ERROR and m["error"]["code"] == "not_registered", timeout=20)
        agent.register()
        instance_id = forwarded["instance_id"]
        agent.send(protocol.reply(forwarded["id"], {"instance_id": instance_id, "info": {}}))
        close = agent.receive(lambda m: m["type"] == protocol.CLOSE_INSTANCE)
        assert close["instance_id"] == instance_id
        assert broker.client.instances() == []
    finally:
        agent.close()
        stop_restarted(broker, restarted)


@pytest.mark.parametrize("result", [None, [], "started"])
def test_an_agent_answer_without_a_result_map_fails_its_request_not_the_broker(tmp_path, result):
    """Before, a start's reply without a result map raised inside the broker's handler: the client got
    `internal`, and the instance stayed `starting`, holding the agent's room."""
    broker = Service("broker", "--agent-secret-file", secret_file(tmp_path)).wait_ready(agents=0)
    agent = PlayedAgent(broker.zmq)
    try:
        agent.register()
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(code_of, broker.client.start_instance, {"type": "local"})
            forwarded = agent.receive(lambda m: m["type"] == protocol.START_INSTANCE)
            agent.send({**protocol.reply(forwarded["id"], {}), "result": result})
            assert start.result(timeout=20) == "environment_error"
        assert broker.client.instances() == []
        assert broker.client.available_resources()["used"]["instances"] == 0
    finally:
        agent.close()
        broker.stop()
