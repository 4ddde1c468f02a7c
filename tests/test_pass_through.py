"""Large agent answers pass through the broker undecoded (broker.PASS_ON_BYTES), with the client's
id put in: what the broker still reads of them (the request's outcome, whether the result is a
map) comes from protocol.skim. An agent played by the test chooses each answer's bytes."""

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice import protocol
from arservice.broker.broker import PASS_ON_BYTES
from arservice.client import ServiceError

from helpers import PlayedAgent, Service, secret_file

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def played(tmp_path):
    """(broker service, played agent, a running instance's id on it)."""
    broker = Service("broker", "--agent-secret-file", secret_file(tmp_path)).wait_ready(agents=0)
    agent = PlayedAgent(broker.zmq)
    try:
        agent.register()
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(broker.client.start_instance, {"type": "local"})
            forwarded = agent.receive(lambda m: m["type"] == protocol.START_INSTANCE)
            agent.send(protocol.reply(forwarded["id"], {"instance_id": forwarded["instance_id"], "info": {}}))
            yield broker, agent, start.result(timeout=20)["instance_id"]
    finally:
        agent.close()
        broker.stop()


def answer_execute(played, answer_of):
    """Run execute through the broker; the played agent answers answer_of(forwarded request). The
    client's result, or the ServiceError it raised."""
    broker, agent, instance_id = played
    with ThreadPoolExecutor(1) as pool:
        execute = pool.submit(broker.client.execute, instance_id, "true", raw=True)
        forwarded = agent.receive(lambda m: m["type"] == protocol.EXECUTE)
        agent.send(answer_of(forwarded))
        try:
            return execute.result(timeout=20)
        except ServiceError as exc:
            return exc


def test_a_large_answer_reaches_its_client_whole_and_is_counted_by_its_outcome(played):
    output = bytes(range(256)) * (PASS_ON_BYTES // 128)  # twice the pass-on size, every byte value
    result = {"output": output, "returncode": 124, "signal": None, "timed_out": True, "truncated": False,
              "duration_s": 1.5, "extra": "x" * 10_000}
    assert answer_execute(played, lambda forwarded: protocol.reply(forwarded["id"], result)) == result
    metrics = urllib.request.urlopen(played[0].url + "/metrics", timeout=10).read().decode()
    assert 'arservice_commands_total{outcome="timed_out",type="local"} 1.0' in metrics.splitlines()


@pytest.mark.parametrize("result", [b"x" * PASS_ON_BYTES, ["x" * PASS_ON_BYTES]])
def test_a_large_answer_without_a_result_map_fails_its_request_not_the_broker(played, result):
    answered = answer_execute(played, lambda forwarded: {**protocol.reply(forwarded["id"], {}), "result": result})
    assert isinstance(answered, ServiceError) and answered.code == "environment_error"
    broker, _, instance_id = played
    assert broker.client.ping()["pong"]
    assert [i["state"] for i in broker.client.instances()] == ["running"]


def test_a_large_start_answer_is_read_whole(played):
    """A start's answer is one the broker reads (its info is kept): it never passes through skimmed."""
    broker, agent, _ = played
    info = {"workdir": "/w", "note": "n" * PASS_ON_BYTES}
    with ThreadPoolExecutor(1) as pool:
        start = pool.submit(broker.client.start_instance, {"type": "local"})
        forwarded = agent.receive(lambda m: m["type"] == protocol.START_INSTANCE)
        agent.send(protocol.reply(forwarded["id"], {"instance_id": forwarded["instance_id"], "info": info}))
        assert start.result(timeout=20)["info"] == info
    assert [i["info"] for i in broker.client.instances() if i["instance_id"] == forwarded["instance_id"]] == [info]
