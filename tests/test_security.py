"""Hostile and careless input (issue 12): a clear 4xx, no dead agent, no unauthenticated memory, no rogue agent."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from arservice import curve, protocol
from arservice.client import ServiceError, ZMQClient

from backends import SPECS, params
from helpers import PlayedBroker, Service, peak_rss_mib, wait_for

pytestmark = pytest.mark.timeout(90)


def http_call(port, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload)


def zmq_ask(address, frame, timeout_s=30, token=None):
    """Send one raw frame and return the answer; with `token`, through the CURVE handshake it keys
    (so that the frame reaches the broker's own checks)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if token:
        curve.secure_client(sock, token)
    sock.connect(address)
    try:
        sock.send_multipart(frame if isinstance(frame, list) else [frame])
        assert sock.poll(timeout_s * 1000), "no answer from the broker"
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close()


# -- 12.1: a byte that exec or open refuses is refused by the broker, before any agent --------

EXECUTE_BAD_BYTES = [
    ("command", {"command": "echo a\0b"}, "NUL"),
    ("cwd", {"command": "true", "cwd": "sub\0dir"}, "NUL"),
    ("env value", {"command": "true", "env": {"A": "x\0y"}}, "NUL"),
    ("env name with =", {"command": "true", "env": {"A=B": "x"}}, "invalid variable name"),
    ("env name with NUL", {"command": "true", "env": {"A\0": "x"}}, "invalid variable name"),
    ("empty env name", {"command": "true", "env": {"": "x"}}, "invalid variable name"),
]
SPEC_BAD_BYTES = [
    ("spec cwd", {"type": "local", "cwd": "/tmp\0x"}, "NUL"),
    ("spec env value", {"type": "local", "env": {"A": "x\0"}}, "NUL"),
    ("spec env name with =", {"type": "local", "env": {"A=B": "x"}}, "invalid variable name"),
    ("spec shell", {"type": "local", "shell": "ba\0sh"}, "NUL"),
    ("bubblewrap option", {"type": "bubblewrap", "bwrap_options": ["--die\0"]}, "NUL"),
]
FILE_BAD_BYTES = [
    ("write path", "/write_file", {"path": "a\0b", "content": "x"}),
    ("read path", "/read_file", {"path": "a\0b"}),
]


def alive_agents(service):
    return sorted(a["agent_id"] for a in service.client.available_resources()["agents"])


@pytest.fixture(params=["local", "local-fast", *params("bubblewrap-per-command")])
def exec_instance(request, service):
    inst = service.client.start_instance(SPECS[request.param])
    yield inst["instance_id"]
    service.client.close_instance(inst["instance_id"])


@pytest.mark.parametrize("what,fields,words", EXECUTE_BAD_BYTES, ids=[c[0] for c in EXECUTE_BAD_BYTES])
def test_bad_bytes_in_a_command_are_400_and_the_agent_lives(service, exec_instance, what, fields, words):
    agents = alive_agents(service)
    status, payload = http_call(service.http_port, "POST", "/execute_command", dict(fields, instance_id=exec_instance))
    assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload
    assert words in payload["error"]["message"]
    with pytest.raises(ServiceError) as err:
        service.client.execute(exec_instance, **fields)
    assert err.value.code == "invalid_request"
    assert alive_agents(service) == agents
    assert service.client.execute(exec_instance, "echo alive")["output"] == "alive\n"


@pytest.mark.parametrize("what,spec,words", SPEC_BAD_BYTES, ids=[c[0] for c in SPEC_BAD_BYTES])
def test_bad_bytes_in_a_spec_are_400(service, what, spec, words):
    agents = alive_agents(service)
    status, payload = http_call(service.http_port, "POST", "/start_instance", {"environment": spec})
    assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload
    assert words in payload["error"]["message"]
    assert alive_agents(service) == agents
    assert service.client.available_resources()["used"]["instances"] == 0


@pytest.mark.parametrize("what,path,fields", FILE_BAD_BYTES, ids=[c[0] for c in FILE_BAD_BYTES])
def test_bad_bytes_in_a_file_path_are_400(service, instance, what, path, fields):
    status, payload = http_call(service.http_port, "POST", path, dict(fields, instance_id=instance))
    assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload
    assert "NUL" in payload["error"]["message"]


def test_agent_survives_what_a_backend_raises():
    """On a real agent behind a broker played by the test (no broker validation in between): the
    agent validates what it is sent with the same schemas (a NUL in cwd, which the broker never
    lets through, is invalid_request; so is a field a broker always fills in, missing), and what
    makes the backend fail (a cwd too long for exec) costs that request only."""
    broker = PlayedBroker("--types", "local")

    def answer_to(msg):
        return broker.answer_to(protocol.encode(msg))
    try:
        ok = answer_to(protocol.request("start_instance", "s1", instance_id="i-1", environment={"type": "local"}))
        assert ok["type"] == "reply", ok
        for n, (fields, code) in enumerate([({"command": "echo a\0b"}, "invalid_request"),
                                            ({"command": "true", "env": {"A=B": "x"}}, "invalid_request"),
                                            ({"command": "true", "cwd": "x\0"}, "invalid_request"),
                                            ({"command": "true", "cwd": "x" * 5000}, "environment_error"),
                                            ({"command": "true", "output_limit": "x"}, "invalid_request"),
                                            ({"command": "true", "output_limit": None}, "invalid_request")]):
            fields = {"output_limit": 1000, **fields}  # as a broker sends it, unless the case says otherwise
            bad = answer_to(protocol.request("execute", f"x{n}", instance_id="i-1", timeout=5, **fields))
            assert bad["type"] == "error" and bad["id"] == f"x{n}", bad
            assert bad["error"]["code"] == code, (fields, bad)
        ok = answer_to(protocol.request("execute", "x9", instance_id="i-1", command="echo alive", timeout=5,
                                        output_limit=1000))
        assert ok["result"]["output"] == b"alive\n"
        assert broker.agent.poll() is None
    finally:
        assert broker.close() == 0


# -- 12.7: numbers and strings that used to give 500 (or 504 at once) -------------------------

BAD_EXECUTE_BODIES = [
    ("timeout 1e20", b'"timeout": 1e20'),
    ("timeout 1e306", b'"timeout": 1e306'),
    ("timeout 1e400", b'"timeout": 1e400'),
    ("timeout NaN", b'"timeout": NaN'),
    ("timeout Infinity", b'"timeout": Infinity'),
    ("timeout -Infinity", b'"timeout": -Infinity'),
    ("timeout -1000", b'"timeout": -1000'),
    ("output_limit 2**70", b'"output_limit": 1180591620717411303424'),
    ("lone surrogate", b'"env": {"A": "\\ud800"}'),
]


@pytest.mark.parametrize("what,extra", BAD_EXECUTE_BODIES, ids=[c[0] for c in BAD_EXECUTE_BODIES])
def test_bad_numbers_and_strings_are_400(service, instance, what, extra):
    raw = b'{"instance_id": "%s", "command": "echo hi", %s}' % (instance.encode(), extra)
    started = time.monotonic()
    status, payload = http_call(service.http_port, "POST", "/execute_command", raw=raw)
    assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload
    assert payload["error"]["message"]
    assert time.monotonic() - started < 10  # answered, not waited out
    assert service.client.execute(instance, "echo alive")["output"] == "alive\n"


@pytest.mark.parametrize("what,spec", [
    ("memory Infinity", b'{"type": "local", "memory": Infinity}'),
    ("memory 1e400g", b'{"type": "local", "memory": "1e400g"}'),
    ("memory nan", b'{"type": "local", "memory": "nan"}'),
    ("timeout 1e306", b'{"type": "local", "timeout": 1e306}'),
    ("start_timeout 1e20", b'{"type": "local", "start_timeout": 1e20}'),
    ("docker cpus 1e400", b'{"type": "docker", "image": "x", "cpus": 1e400}'),
])
def test_bad_numbers_in_a_spec_are_400(service, what, spec):
    status, payload = http_call(service.http_port, "POST", "/start_instance", raw=b'{"environment": %s}' % spec)
    assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload


@pytest.mark.parametrize("spec", [
    {"type": "docker", "image": "x", "cpus": float("inf")},
    {"type": "docker", "image": "x", "cpus": float("nan")},
    {"type": "local", "memory": float("inf")},
    {"type": "local", "timeout": 1e306},
])
def test_bad_numbers_over_zmq_are_400_and_resources_stay_json(service, spec):
    answer = zmq_ask(service.zmq, protocol.encode(protocol.request("start_instance", 1, environment=spec)))
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_request", answer
    status, resources = http_call(service.http_port, "GET", "/get_available_resources")
    assert status == 200 and resources["used"]["instances"] == 0


def test_deeply_nested_json_is_400(service):
    for depth in (100_000, 1000):
        status, payload = http_call(service.http_port, "POST", "/start_instance",
                                    raw=b'{"environment": ' + b"[" * depth + b"]" * depth + b"}")
        assert (status, payload["error"]["code"]) == (400, "invalid_request"), payload


def test_ping_without_id_is_400(service):
    answer = zmq_ask(service.zmq, msgpack.packb({"v": 1, "type": "ping"}))
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_request"
    assert "'id'" in answer["error"]["message"]


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_fractional_cpus_add_up_to_zero(service, name):
    before = service.client.available_resources()["used"]["cpus"]
    started = [service.client.start_instance(dict(SPECS[name], cpus=cpus))["instance_id"] for cpus in (0.1, 0.2, 0.3)]
    assert service.client.available_resources()["used"]["cpus"] == pytest.approx(before + 0.6)
    for instance_id in started:
        service.client.close_instance(instance_id)
    assert service.client.available_resources()["used"]["cpus"] == before


@pytest.fixture(scope="module")
def guarded():
    svc = Service("--runner", "local", token="s3cret").wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.mark.parametrize("header", ["Bearer s3crét", "Bearer \u00ff\u00fe", "s3cret\u00e9"])
def test_non_ascii_credentials_are_401(guarded, header):
    conn = http.client.HTTPConnection("127.0.0.1", guarded.http_port, timeout=30)
    conn.putrequest("GET", "/get_available_resources")
    conn.putheader("Authorization", header.encode("latin-1"))
    conn.endheaders()
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert (response.status, payload["error"]["code"]) == (401, "unauthorized")
    answer = zmq_ask(guarded.zmq, protocol.encode(protocol.request("resources", 1, token="s3crét")), token="s3cret")
    assert answer["type"] == "error" and answer["error"]["code"] == "unauthorized"


# -- 12.4: an unauthenticated peer costs its bytes at most, never a parse ---------------------


def test_unauthenticated_frames_and_bodies_are_not_parsed(guarded):
    """16 MiB of empty maps took the service from 35 MiB to 1.2 GiB before its token was looked at;
    now it costs the frame's bytes (and its copy) at most."""
    frame = msgpack.packb({"v": 1, "type": "ping", "id": 1, "pad": [{}] * (16 << 20)})
    before = peak_rss_mib(guarded.proc.pid)
    answer = zmq_ask(guarded.zmq, protocol.split(frame), token="s3cret")
    assert answer["type"] == "error" and answer["error"]["code"] == "unauthorized"
    forged = msgpack.packb({"v": 1, "type": "reply", "id": "b1", "result": [{}] * (16 << 20)})
    answer = zmq_ask(guarded.zmq, protocol.split(forged), token="s3cret")
    assert answer["type"] == "error" and answer["error"]["code"] == "not_registered"
    body = b'{"environment": [' + b"[]," * (8 << 20) + b"[]]}"
    status, payload = http_call(guarded.http_port, "POST", "/start_instance", raw=body)
    assert (status, payload["error"]["code"]) == (401, "unauthorized")
    grown = peak_rss_mib(guarded.proc.pid) - before
    assert grown < 120, f"the service's peak memory grew by {grown:.0f} MiB"
    assert guarded.client.ping()["pong"] is True


# -- 12.5: agents need a secret even when clients need no token -------------------------------

def test_rogue_agent_is_refused_without_a_token(service):
    agents = alive_agents(service)
    env = {k: v for k, v in os.environ.items() if k not in ("ARSERVICE_TOKEN", "ARSERVICE_TOKEN_FILE")}
    proc = subprocess.run([sys.executable, "-m", "arservice", "agent", "--broker", service.zmq, "--types", "local"], check=False,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "wrong agent secret" in proc.stderr
    assert alive_agents(service) == agents


def test_agent_secret_is_not_on_a_command_line(service):
    for pid in service.agent_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert not any(b"token" in arg.lower() or b"secret" in arg.lower() for arg in argv), argv


# -- 12.3: an agent stops in bounded time whatever its threads are doing ----------------------

class HungEngine:
    """A container engine socket that accepts connections and never answers (a wedged dockerd)."""

    def __init__(self, path):
        self.path = path
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(64)
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.server.close()
        for conn in self.conns:
            conn.close()


def test_agent_stops_in_bounded_time_with_a_thread_blocked(tmp_path):
    """A start blocked in a container engine that never answers: SIGTERM still ends the agent
    within its --stop-timeout (before: it waited 60 s for the close, then forever for the thread)."""
    svc = Service("broker", token="s3cret").wait_ready(agents=0)
    engine = HungEngine(str(tmp_path / "engine.sock"))
    env = dict(os.environ, ARSERVICE_TOKEN="s3cret", CONTAINER_HOST=f"unix://{engine.path}")
    agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq, "--types", "podman",
                              "--stop-timeout", "2"], env=env, stderr=subprocess.DEVNULL)
    starter = ZMQClient(svc.zmq, token="s3cret")
    try:
        wait_for(lambda: svc.client.available_resources()["agents"], timeout=20, what="the agent to register")
        thread = threading.Thread(target=lambda: pytest.raises(ServiceError, starter.start_instance,
                                                               {"type": "podman", "image": "busybox"}), daemon=True)
        thread.start()
        wait_for(lambda: [i for i in svc.client.instances() if i["state"] == "starting"], timeout=20,
                 what="the start to reach the agent")
        wait_for(lambda: len(engine.conns) >= 1, timeout=20, what="the agent to call the engine")
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(timeout=15) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("the agent did not stop within 15 s of SIGTERM") from None
        wait_for(lambda: not svc.client.available_resources()["agents"], timeout=10, what="the agent to say goodbye")
        thread.join(timeout=20)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        starter.close()
        engine.close()
        assert svc.stop() == 0


def test_agent_raises_its_descriptor_limit():
    """Issue 21.1: an agent started with a low soft RLIMIT_NOFILE raises it to the hard limit."""
    import resource
    svc = Service("broker", token="s3cret").wait_ready(agents=0)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", svc.zmq, "--types", "local"],
                             env=dict(os.environ, ARSERVICE_TOKEN="s3cret"), stderr=subprocess.DEVNULL,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))  # noqa: PLW1509
    try:
        wait_for(lambda: svc.client.available_resources()["agents"], timeout=20, what="the agent to register")
        with open(f"/proc/{agent.pid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
        assert int(soft) == hard
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0
        assert svc.stop() == 0
