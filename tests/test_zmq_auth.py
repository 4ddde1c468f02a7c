"""ZeroMQ with a token (issue 12 item 4): a peer without it passes no frame and costs no memory; a
wrong or missing token is `unauthorized` at once; the right one works for every kind of ZMQ peer.
And a runner-less broker never takes any agent that knocks (item 5's spirit)."""

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
import zmq

from arservice import curve, protocol
from arservice.aio import AsyncZMQClient
from arservice.client import HTTPClient, ServiceError, ZMQClient

from helpers import Service, peak_rss_mib, wait_for

pytestmark = pytest.mark.timeout(90)

TOKEN = "zmq-auth-token"
ATTACK_BYTES = 64 << 20
# How long a refused client may take to say so (three handshakes, 0.1 s apart, on a loaded machine).
REFUSAL_S = 5.0


@pytest.fixture(scope="module")
def guarded():
    """A service with a token whose HTTP front end runs in a worker process: a ZMQ client over TCP too."""
    svc = Service("--runner", "local", "--http-workers", "1", token=TOKEN).wait_ready()
    yield svc
    assert svc.stop() == 0



def zmtp_greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting, as a client announcing `mechanism` sends it."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def send_raw_frame(port: int, mechanism: bytes) -> int:
    """Announce `mechanism`, then send one 64 MiB frame as a handshake command: the bytes the broker took."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        try:
            conn.sendall(zmtp_greeting(mechanism) + b"\x06" + struct.pack(">Q", ATTACK_BYTES))
            chunk = b"\0" * (1 << 20)
            while sent < ATTACK_BYTES:
                sent += conn.send(chunk)
        except OSError:  # the broker closed the connection: what it read so far is all it took
            pass
    return sent


def dealer(address: str, server_key: bytes | None = None, events: int = 0) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A DEALER without the token (no keys, or the broker's key, to reach ZAP, and a key pair of its
    own), and a monitor of those of its events (attached before it connects, to miss none)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 100)  # once refused it has no connection to queue on: Again
    if server_key is not None:
        public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    monitor = sock.get_monitor_socket(events) if events else None
    sock.connect(address)
    return sock, monitor


def test_peers_without_the_token_pass_no_frame_and_cost_no_memory(guarded):
    """A ZMQ peer without the token sending 64 MiB frames, one that knows the broker's key but not the
    client key, and raw TCP peers sending a 64 MiB frame in the handshake: none costs the service memory.
    Before CURVE, each frame was read whole (three 64 MiB frames: +235 MiB peak); with CURVE but no
    frame limit, a 64 MiB handshake command still was (+128 MiB peak)."""
    before = peak_rss_mib(guarded.proc.pid)
    anonymous, _ = dealer(guarded.zmq)
    impostor, refusals = dealer(guarded.zmq, server_key=curve.keypair(TOKEN, "broker")[0],
                                events=zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        frame = protocol.encode({"v": 1, "type": "ping", "id": 1, "token": TOKEN, "pad": b"\0" * ATTACK_BYTES})
        for _ in range(3):
            for sock in (anonymous, impostor):
                try:
                    sock.send(frame)
                except zmq.Again:
                    pass  # no connection to queue it on: refused
            for mechanism in (b"NULL", b"CURVE"):
                assert send_raw_frame(guarded.zmq_port, mechanism) < ATTACK_BYTES
        assert refusals.poll(10000), "the broker's ZAP handler did not refuse a key not derived from the token"
        assert not anonymous.poll(100) and not impostor.poll(0), "a peer without the token got an answer"
    finally:
        impostor.disable_monitor()
        refusals.close()
        anonymous.close()
        impostor.close()
    grown = peak_rss_mib(guarded.proc.pid) - before
    assert grown < 8, f"the service's peak memory grew by {grown:.0f} MiB"
    assert guarded.client.ping()["pong"] is True
    assert "handshake_refused" in guarded.output()


@pytest.mark.parametrize("token", ["", "wrong"])
def test_a_missing_or_wrong_token_is_unauthorized_at_once(guarded, token):
    client = ZMQClient(guarded.zmq, token=token)
    started = time.monotonic()
    try:
        with pytest.raises(ServiceError) as err:
            client.ping()
        assert err.value.code == "unauthorized"
        assert "token" in err.value.message
        assert time.monotonic() - started < REFUSAL_S
        with pytest.raises(ServiceError) as err:  # and again: a refused socket is replaced, not waited on
            client.available_resources()
        assert err.value.code == "unauthorized"
    finally:
        client.close()

    async def asynchronously():
        async with AsyncZMQClient(guarded.zmq, token=token) as aclient:
            with pytest.raises(ServiceError) as err:
                await aclient.ping()
            return err.value
    started = time.monotonic()
    refused = asyncio.run(asynchronously())
    assert refused.code == "unauthorized" and "token" in refused.message
    assert time.monotonic() - started < REFUSAL_S


def test_a_token_for_a_broker_without_one_is_unauthorized(service):
    client = ZMQClient(service.zmq, token="unasked")
    try:
        with pytest.raises(ServiceError) as err:
            client.ping()
        assert err.value.code == "unauthorized" and "takes none" in err.value.message
    finally:
        client.close()


def test_the_token_works_over_zmq_and_http_workers_with_messages_larger_than_a_frame(guarded):
    payload = os.urandom(3 * protocol.MAX_FRAME_BYTES + 5)  # travels as four frames, each way through an agent
    inst = guarded.client.start_instance({"type": "local"})["instance_id"]
    try:
        guarded.client.write_file(inst, "big", payload)
        assert guarded.client.read_file(inst, "big") == payload
        assert guarded.client.execute(inst, "wc -c < big")["output"].strip() == str(len(payload))

        async def asynchronously():
            async with AsyncZMQClient(guarded.zmq, token=TOKEN) as aclient:
                await aclient.write_file(inst, "big2", payload)
                return await aclient.read_file(inst, "big2")
        assert asyncio.run(asynchronously()) == payload
        # The HTTP worker process is a ZMQ client of the broker over TCP: it holds the token's key.
        assert guarded.http.execute(inst, "cmp big big2 && echo same")["output"] == "same\n"
        with pytest.raises(ServiceError) as err:
            HTTPClient(guarded.url, token="wrong").available_resources()
        assert err.value.code == "unauthorized"
    finally:
        guarded.client.close_instance(inst)


def test_agents_with_a_wrong_token_or_none_exit_saying_so(guarded, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARSERVICE_")}
    # An agent offering docker on a host whose engine is down: its start-up reap fails and retries.
    not_a_socket = tmp_path / "docker.sock"
    not_a_socket.touch()
    engine_down = {"DOCKER_HOST": f"unix://{not_a_socket}"}
    for extra, words, types in (({"ARSERVICE_TOKEN": "wrong"}, "token", "local"),
                                ({"ARSERVICE_AGENT_SECRET": "not the token"}, "requires a token", "local"),
                                ({"ARSERVICE_TOKEN": "wrong", **engine_down}, "token", "local,docker")):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "arservice", "agent", "--broker", guarded.zmq, "--types", types],
                              check=False, env=dict(env, **extra), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 3, proc.stderr
        assert "wrong agent secret" in proc.stderr and words in proc.stderr
        # Refused within a second; its exit once waited for the start-up reap's retries (15 s):
        # even though every backend had answered, and still where one (an engine that is down) had not.
        assert time.monotonic() - started < 10, proc.stderr
    assert len(guarded.client.available_resources()["agents"]) == 1


# -- a broker without a runner: agents need a secret ------------------------------------------------

def arservice_broker(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ARSERVICE_")}
    return subprocess.run([sys.executable, "-m", "arservice", "broker", "--port", "0", "--zmq-port", "0", *args],
                          check=False, env=dict(clean, **(env or {})), capture_output=True, text=True, timeout=30)


def test_a_runnerless_broker_refuses_to_start_open_to_any_agent(tmp_path):
    refused = arservice_broker()
    assert refused.returncode == 2
    assert "--token" in refused.stderr and "--agent-secret-file" in refused.stderr
    secret = tmp_path / "secret"
    secret.write_text("a secret\n")
    both = arservice_broker("--agent-secret-file", str(secret), env={"ARSERVICE_TOKEN": TOKEN})
    assert both.returncode == 2 and "with --token, agents present the token" in both.stderr
    (tmp_path / "empty").write_text("\n")
    empty = arservice_broker("--agent-secret-file", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "is empty" in empty.stderr


def test_a_runnerless_broker_with_an_agent_secret_takes_only_agents_holding_it(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("the agents' secret\n")
    svc = Service("broker", "--agent-secret-file", str(secret)).wait_ready(agents=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARSERVICE_")}
    agent = None
    try:
        rogue = subprocess.run([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq, "--types", "local"],
                               check=False, env=env, capture_output=True, text=True, timeout=30)
        assert rogue.returncode == 3 and "wrong agent secret" in rogue.stderr
        agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq, "--types", "local",
                                  "--agent-secret-file", str(secret)], env=env, stdin=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        wait_for(lambda: svc.client.available_resources()["agents"], timeout=30, what="the agent with the secret")
        inst = svc.client.start_instance({"type": "local"})["instance_id"]  # clients need no token here
        assert svc.client.execute(inst, "echo ok")["output"] == "ok\n"
        svc.client.close_instance(inst)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        assert svc.stop() == 0


@pytest.mark.daemon  # Slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (scripts/setup.sh installs it)")
@pytest.mark.timeout(180)
def test_slurm_agents_given_the_token_file_register_over_curve():
    svc = Service("--runner", "slurm", "--max-resources", '{"jobs": 1}', "--slurm-instances", "1",
                  "--start-wait", "120", token=TOKEN).wait_ready(agents=0)
    job_name = svc.client.available_resources()["runner"]["job_name"]
    try:
        inst = svc.client.start_instance({"type": "local"}, wait_s=120)["instance_id"]
        assert svc.client.execute(inst, "echo $SLURM_JOB_ID")["output"].strip()
        svc.client.close_instance(inst)
    finally:
        output = svc.output()
        assert svc.stop() == 0, output
        subprocess.run(["scancel", f"--name={job_name}"], check=True)
