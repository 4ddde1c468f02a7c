"""Bad input gets a clear error with a stable code, and changes nothing."""

import http.client
import json

import msgpack
import pytest
import zmq

from arservice import protocol
from arservice.aio import AsyncHTTPClient
from arservice.client import HTTPClient

from conftest import MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(60)


def http_call(service, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


@pytest.fixture
def unchanged(service, instance):
    """Yields a running instance id; afterwards the service's state must be as it was."""
    before = (service.client.available_resources()["used"], sorted(i["instance_id"] for i in service.client.instances()))
    yield instance
    after = (service.client.available_resources()["used"], sorted(i["instance_id"] for i in service.client.instances()))
    assert after == before
    assert service.client.execute(instance, "echo still fine")["output"] == "still fine\n"


BAD_REQUESTS = [
    # (path, body, status, code, words in the message)
    ("/start_instance", {}, 400, "invalid_request", "environment"),
    ("/start_instance", {"environment": 5}, 400, "invalid_request", "environment"),
    ("/start_instance", {"environment": {"type": "nope"}}, 400, "invalid_request", "unknown environment type"),
    ("/start_instance", {"environment": {}}, 400, "invalid_request", "unknown environment type"),
    ("/start_instance", {"environment": {"type": "local", "imgae": "x"}}, 400, "invalid_request", "imgae"),
    ("/start_instance", {"environment": {"type": "local", "timeout": "10"}}, 400, "invalid_request", "timeout"),
    ("/start_instance", {"environment": {"type": "local", "timeout": -1}}, 400, "invalid_request", "timeout"),
    ("/start_instance", {"environment": {"type": "local", "memory": "lots"}}, 400, "invalid_request", "memory"),
    ("/start_instance", {"environment": {"type": "local", "env": {"A": 1}}}, 400, "invalid_request", "env"),
    ("/start_instance", {"environment": "no-such-preset"}, 404, "not_found", "no-such-preset"),
    ("/execute_command", {"command": "true"}, 400, "invalid_request", "instance_id"),
    ("/execute_command", {"instance_id": "i-nope", "command": "true"}, 404, "not_found", "i-nope"),
    ("/execute_command", {"instance_id": "$INST"}, 400, "invalid_request", "command"),
    ("/execute_command", {"instance_id": "$INST", "command": 5}, 400, "invalid_request", "command"),
    ("/execute_command", {"instance_id": "$INST", "command": "true", "timeout": "soon"}, 400, "invalid_request", "timeout"),
    ("/execute_command", {"instance_id": "$INST", "command": "true", "timeout": 0}, 400, "invalid_request", "timeout"),
    ("/execute_command", {"instance_id": "$INST", "command": "true", "env": {"A": 1}}, 400, "invalid_request", "env"),
    ("/execute_command", {"instance_id": "$INST", "command": "true", "cwd": ["x"]}, 400, "invalid_request", "cwd"),
    ("/execute_command", {"instance_id": ["$INST"], "command": "true"}, 400, "invalid_request", "instance_id"),
    ("/close_instance", {}, 400, "invalid_request", "instance_id"),
    ("/close_instance", {"instance_id": "i-nope"}, 404, "not_found", "i-nope"),
    ("/write_file", {"instance_id": "$INST", "path": "x"}, 400, "invalid_request", "content"),
    ("/write_file", {"instance_id": "$INST", "path": "x", "content": "!!", "base64": True}, 400, "invalid_request", "base64"),
    ("/write_file", {"instance_id": "$INST", "path": "x", "content": "é", "base64": True}, 400, "invalid_request", "base64"),
    ("/write_file", {"instance_id": "$INST", "path": "x", "content": "a", "mode": 99999}, 400, "invalid_request", "mode"),
    ("/read_file", {"instance_id": "$INST"}, 400, "invalid_request", "path"),
]


@pytest.mark.parametrize("path,body,status,code,words", BAD_REQUESTS)
def test_bad_http_request(service, unchanged, path, body, status, code, words):
    body = json.loads(json.dumps(body).replace("$INST", unchanged))
    got_status, payload = http_call(service, "POST", path, body)
    assert (got_status, payload["error"]["code"]) == (status, code)
    assert words in payload["error"]["message"]


@pytest.mark.parametrize("raw,words", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")])
def test_malformed_http_body(service, unchanged, raw, words):
    status, payload = http_call(service, "POST", "/execute_command", raw=raw)
    assert status == 400 and payload["error"]["code"] == "invalid_request" and words in payload["error"]["message"]


def test_body_too_large(service, unchanged):
    big = json.dumps({"instance_id": unchanged, "command": "x" * MAX_REQUEST_BYTES}).encode()
    status, payload = http_call(service, "POST", "/execute_command", raw=big)
    assert status == 413 and payload["error"]["code"] == "payload_too_large"


def test_unknown_route_and_wrong_method(service, unchanged):
    status, payload = http_call(service, "GET", "/nope")
    assert status == 404 and payload["error"]["code"] == "not_found"
    status, payload = http_call(service, "GET", "/start_instance")
    assert status == 405 and payload["error"]["code"] == "invalid_request"


def test_no_capacity_is_503(service, unchanged):
    extra = []
    try:
        while True:
            status, payload = http_call(service, "POST", "/start_instance", {"environment": {"type": "local"}})
            if status != 200:
                break
            extra.append(payload["instance_id"])
            assert len(extra) < 8, "the service admitted more than --max-resources allows"
        assert status == 503 and payload["error"]["code"] == "no_capacity"
        assert "instances" in payload["error"]["message"]
    finally:
        for instance_id in extra:
            service.client.close_instance(instance_id)


@pytest.fixture
def raw_socket(service):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.zmq)
    yield sock
    sock.close()


def ask(sock, *frames):
    sock.send_multipart(list(frames))
    assert sock.poll(10000), "no answer from the broker"
    return msgpack.unpackb(sock.recv_multipart()[-1])


@pytest.mark.parametrize("frame,code", [
    (b"\xc1garbage", "invalid_request"),
    (msgpack.packb([1, 2, 3]), "invalid_request"),
    (msgpack.packb({"type": "ping", "id": 1}), "unsupported_version"),
    (msgpack.packb({"v": 99, "type": "ping", "id": 1}), "unsupported_version"),
    (msgpack.packb({"v": 1, "id": 1}), "invalid_request"),
    (msgpack.packb({"v": 1, "type": "launch_missiles", "id": 1}), "invalid_request"),
    (msgpack.packb({"v": 1, "type": "execute", "id": 1}), "invalid_request"),
    (msgpack.packb({"v": 1, "type": "execute", "id": 1, "instance_id": "i-x", "command": "true"}), "not_found"),
    (msgpack.packb({"v": 1, "type": "heartbeat", "id": 1}), "not_registered"),
    # The local runner's agents hold a secret of the run: a stranger cannot register, even without --token.
    (msgpack.packb({"v": 1, "type": "register", "id": 1, "agent_id": "x"}), "unauthorized"),
])
def test_bad_zmq_frames_get_error_replies(service, unchanged, raw_socket, frame, code):
    answer = ask(raw_socket, frame)
    assert answer["type"] == "error" and answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    pong = ask(raw_socket, protocol.encode(protocol.request("ping", 7)))
    assert pong["type"] == "reply" and pong["id"] == 7


def test_extra_frames_are_tolerated(service, unchanged, raw_socket):
    answer = ask(raw_socket, b"", protocol.encode(protocol.request("ping", "with-delimiter")))
    assert answer["type"] == "reply" and answer["id"] == "with-delimiter"


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "http://:8000", "tcp://127.0.0.1:5555",
                                 "http://host:port", "https://127.0.0.1:8000"])
def test_an_http_client_refuses_an_address_it_cannot_use_when_made(url):
    with pytest.raises(ValueError, match="not a service URL"):
        HTTPClient(url)


def test_the_async_http_client_takes_https_and_refuses_what_is_no_url():
    AsyncHTTPClient("https://example.invalid:8443")
    with pytest.raises(ValueError, match=r"http or https://HOST\[:PORT\]"):
        AsyncHTTPClient("localhost:8000")
