"""Python clients: the same methods over ZeroMQ (straight to the broker) or over HTTP.

Both are safe to use from many threads: each thread gets its own socket or connection.

    client = ZMQClient("tcp://127.0.0.1:5555")        # or HTTPClient("http://127.0.0.1:8000")
    inst = client.start_instance({"type": "local"})
    print(client.execute(inst["instance_id"], "echo hi")["output"])
    client.close_instance(inst["instance_id"])
"""

import base64
import http.client
import itertools
import json
import os
import threading
import time
import urllib.parse

import zmq

from . import protocol
from .http.routes import BYTES_IN, BYTES_OUT, PATHS, ROUTES

# How long a client waits beyond a command's own time limit, and for anything else.
EXECUTE_MARGIN_S = 30.0
DEFAULT_WAIT_S = 600.0


class ServiceError(Exception):
    """An error answer from the service, with its stable code."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """The methods both transports share; subclasses provide `_call(kind, wait_s, fields)`."""

    def start_instance(self, environment):
        """environment: a preset name or a spec such as {"type": "local"}."""
        return self._call(protocol.START_INSTANCE, DEFAULT_WAIT_S, {"environment": environment})

    def execute(self, instance_id, command, timeout=None, cwd=None, env=None, output_limit=None, raw=False):
        """Run a shell command; `output` is text, or bytes with raw=True."""
        fields = {"instance_id": instance_id, "command": command, "timeout": timeout, "cwd": cwd,
                  "env": env, "output_limit": output_limit}
        wait_s = (timeout or DEFAULT_WAIT_S) + EXECUTE_MARGIN_S
        result = self._call(protocol.EXECUTE, wait_s, _present(fields))
        if not raw:
            result["output"] = result["output"].decode("utf-8", errors="replace")
        return result

    def write_file(self, instance_id, path, content, mode=0o644):
        content = content.encode() if isinstance(content, str) else content
        return self._call(protocol.WRITE_FILE, DEFAULT_WAIT_S, {"instance_id": instance_id, "path": path, "content": content, "mode": mode})

    def read_file(self, instance_id, path, limit=None):
        """The file's bytes."""
        fields = _present({"instance_id": instance_id, "path": path, "limit": limit})
        return self._call(protocol.READ_FILE, DEFAULT_WAIT_S, fields)["content"]

    def close_instance(self, instance_id):
        return self._call(protocol.CLOSE_INSTANCE, DEFAULT_WAIT_S, {"instance_id": instance_id})

    def available_resources(self):
        return self._call(protocol.RESOURCES, DEFAULT_WAIT_S, {})

    def instances(self):
        return self._call(protocol.INSTANCES, DEFAULT_WAIT_S, {})["instances"]

    def status(self):
        """Agents, every instance, the runner's report and recent errors: what the status page shows."""
        return self._call(protocol.STATUS, DEFAULT_WAIT_S, {})

    def ping(self):
        return self._call(protocol.PING, DEFAULT_WAIT_S, {})


def _present(fields):
    return {k: v for k, v in fields.items() if v is not None}


class ZMQClient(Client):
    """The low-latency path: msgpack over a DEALER socket straight to the broker."""

    def __init__(self, address, token=None, context=None):
        self.address = address
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        self.ctx = context or zmq.Context.instance()
        self._local = threading.local()
        self._sockets = {}  # thread -> its socket
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _socket(self):
        sock = getattr(self._local, "sock", None)
        if sock is None:
            with self._lock:
                # Threads come and go (pools, one per task): close what ended ones left, or the
                # sockets pile up to ZeroMQ's limit. No other thread uses a dead thread's socket.
                for thread in [t for t in self._sockets if not t.is_alive()]:
                    self._sockets.pop(thread).close(linger=0)
                sock = self._local.sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(self.address)
                self._sockets[threading.current_thread()] = sock
        return sock

    def _call(self, kind, wait_s, fields):
        return self.request(kind, wait_s, **fields)

    def request(self, kind, wait_s=DEFAULT_WAIT_S, **fields):
        """Send one message and wait for its answer; the result, or ServiceError."""
        sock = self._socket()
        msg_id = next(self._ids)
        if self.token:
            fields["token"] = self.token
        sock.send(protocol.encode(protocol.request(kind, msg_id, **fields)))
        deadline = time.monotonic() + wait_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000):
                raise ServiceError("timeout", f"no answer from the broker at {self.address} within {wait_s:.0f}s")
            answer = protocol.decode(sock.recv())
            if answer.get("id") != msg_id:
                continue  # a late answer to an earlier request that timed out
            if answer["type"] == protocol.ERROR:
                raise ServiceError(answer["error"]["code"], answer["error"]["message"])
            return answer["result"]

    def close(self):
        """Close every socket; call when no request is in flight."""
        with self._lock:
            for sock in self._sockets.values():
                sock.close(linger=0)
            self._sockets.clear()


class HTTPClient(Client):
    """The same methods over the HTTP API, with one keep-alive connection per thread."""

    def __init__(self, url, token=None):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        self._local = threading.local()

    def _call(self, kind, wait_s, fields):
        path = PATHS[kind]
        method = ROUTES[path][0]
        body = None
        if method == "POST":
            fields = dict(fields, base64=True)
            if kind in BYTES_IN:
                fields[BYTES_IN[kind]] = base64.b64encode(fields[BYTES_IN[kind]]).decode()
            body = json.dumps(fields).encode()
        status, answer = self._send(method, path, body, wait_s)
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ServiceError(error.get("code", f"http_{status}"), error.get("message", str(answer)))
        if kind in BYTES_OUT:
            answer[BYTES_OUT[kind]] = base64.b64decode(answer[BYTES_OUT[kind]])
        return answer

    def _send(self, method, path, body, wait_s):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one fresh retry
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=wait_s)
            conn.timeout = wait_s
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data else {}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
            except TimeoutError:
                conn.close()
                self._local.conn = None
                raise ServiceError("timeout", f"no answer from {self.host}:{self.port}{path} within {wait_s:.0f}s")
