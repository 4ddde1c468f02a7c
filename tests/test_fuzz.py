"""A bounded fuzz run (issue 12): random and mutated msgpack frames to the ZMQ port, random JSON
to every HTTP route. No answer may be a 500, no agent or broker may die, and the service's state
is as it was (what a random request happened to start is closed again).

Random requests never run a random command or write a random path: the one real instance only
gets `true` as a command and a fixed file name, so the fuzzer cannot touch this host."""

import http.client
import json
import math
import os

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arservice import protocol
from arservice.protocol import ROUTES

from helpers import Service

pytestmark = pytest.mark.timeout(180)

# Under CI the same examples every run (a landing must not hang on what a new draw happens to
# find); elsewhere fresh ones each run, to keep exploring.
FUZZ = settings(max_examples=250, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = ["instance_id", "command", "timeout", "cwd", "env", "output_limit", "path", "content", "mode", "limit",
          "environment", "base64", "token", "id", "v", "type", "status", "agent_id", "secret", "capacity"]
TYPES = sorted({kind for _, kind in ROUTES.values()} | {"register", "heartbeat", "disconnect", "reply", "error",
                                                        "runner_status", "release_agent", "nope"})

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | st.binary(max_size=30))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
# Docker specs never pull: a random image name must not reach a registry.
specs = st.fixed_dictionaries({"type": st.sampled_from(["local", "docker", "bubblewrap", "nope", 5])},
                              optional={k: values for k in ("cwd", "env", "timeout", "output_limit", "cpus", "memory",
                                                             "shell", "image", "start_timeout", "pids", "network")}
                              ).map(lambda spec: {**spec, "pull": "never"} if spec["type"] == "docker" else spec)


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 6}').wait_ready(agents=2)
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def target(service):
    """The one real instance, and the service's state before the fuzzing; checked afterwards."""
    inst = service.client.start_instance({"type": "local"})["instance_id"]
    before = service.client.available_resources()
    started = []  # instances a random start happened to create
    yield inst, started
    for instance_id in started:
        service.client.close_instance(instance_id)
    after = service.client.available_resources()
    assert sorted(a["pid"] for a in after["agents"]) == sorted(a["pid"] for a in before["agents"])
    assert after["used"] == before["used"] and after["instances"] == before["instances"]
    assert service.client.execute(inst, "echo still fine")["output"] == "still fine\n"
    service.client.close_instance(inst)


def harmless(fields, inst, kind):
    """Aim a random request at the real instance without letting it run or write anything chosen at random."""
    if fields.get("instance_id") == inst:
        if kind == protocol.EXECUTE:
            fields["command"] = "true"
        elif kind == protocol.WRITE_FILE:
            fields["path"] = "fuzz.txt"
        elif kind == protocol.CLOSE_INSTANCE:
            fields["instance_id"] = "i-fuzz"
    return fields


def remember(answer, started, inst):
    """Note what a random start (or fork: its `instances`) happened to create, to close it afterwards."""
    if not isinstance(answer, dict):
        return
    forked = "source" in answer and isinstance(answer.get("instances"), list)  # (GET /instances lists them too)
    made = answer["instances"] if forked else [answer]
    for item in made:
        if isinstance(item, dict) and isinstance(item.get("instance_id"), str) and item["instance_id"] != inst:
            started.append(item["instance_id"])


# -- ZMQ ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dealer(service):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.zmq)
    yield sock
    sock.close()


def exchange(sock, frame):
    """Send a frame; the answer if one comes (a frame that is an answer itself may get none)."""
    sock.send(frame)
    if not sock.poll(5000):
        return None
    answer = msgpack.unpackb(sock.recv(), strict_map_key=False)
    assert not (answer.get("type") == "error" and answer["error"]["code"] == "internal"), answer
    return answer


def request_frames(inst):
    fields = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
    aimed = st.sampled_from([inst, "i-fuzz"])
    return st.builds(lambda kind, f, target, spec: {"v": 1, "type": kind, "id": 1,
                                                    **harmless({**f, "instance_id": target, "environment": spec}, inst, kind)},
                     st.sampled_from(TYPES), fields, aimed, specs)


def mutated(frame, data):
    """A valid frame with bytes flipped, cut or inserted."""
    frame = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(0, len(frame) - 1)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and frame:
            frame[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del frame[at:]
        else:
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(frame)


@FUZZ
@given(data=st.data())
def test_fuzz_zmq_frames(service, target, dealer, data):
    inst, started = target
    message = data.draw(request_frames(inst))
    if message["type"] in (protocol.START_INSTANCE, protocol.EXECUTE, protocol.WRITE_FILE) and data.draw(st.booleans()):
        frame = mutated(msgpack.packb(message), data)  # a mutation could make a command of its own: not on our instance
        if inst.encode() in frame:
            frame = frame.replace(inst.encode(), b"i-fuzz-xxxxxx")
    else:
        frame = data.draw(st.one_of(st.just(msgpack.packb(message)), st.binary(max_size=64),
                                    values.map(lambda v: msgpack.packb(v))))
    answer = exchange(dealer, frame)
    if answer and answer.get("type") == "reply":
        remember(answer.get("result"), started, inst)


# -- HTTP --------------------------------------------------------------------------------------

def _no_constant(name):
    raise AssertionError(f"the answer holds {name}, which JSON does not allow")


@FUZZ
@given(data=st.data())
def test_fuzz_http_routes(service, target, data):
    inst, started = target
    path = data.draw(st.sampled_from(sorted(ROUTES)))
    method, kind = ROUTES[path]
    method = data.draw(st.sampled_from([method, method, "POST" if method == "GET" else "GET", "PUT"]))
    body = data.draw(st.one_of(
        json_values,
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(
            lambda f: harmless({**f, "instance_id": inst}, inst, kind) if "instance_id" in f else f),
        st.builds(lambda spec: {"environment": spec}, specs.filter(lambda s: _json_safe(s)))))
    raw = json.dumps(body).encode() if data.draw(st.booleans()) else data.draw(st.binary(max_size=64))
    if inst.encode() in raw and kind in (protocol.EXECUTE, protocol.WRITE_FILE, protocol.CLOSE_INSTANCE) \
            and not isinstance(body, dict):
        raw = raw.replace(inst.encode(), b"i-fuzz-xxxxxx")
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=30)
    try:
        conn.request(method, path, body=raw if method != "GET" else None, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read(), parse_constant=_no_constant)  # NaN/Infinity are no JSON
    finally:
        conn.close()
    assert response.status != 500 and response.status < 600, answer
    if response.status == 200:
        remember(answer, started, inst)
    else:
        assert answer["error"]["code"] != "internal" and answer["error"]["message"], answer


def _json_safe(value):
    """A spec JSON can carry: no bytes, no non-finite floats."""
    if isinstance(value, bytes) or (isinstance(value, float) and not math.isfinite(value)):
        return False
    if isinstance(value, dict):
        return all(_json_safe(k) and _json_safe(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_safe(v) for v in value)
    return True

