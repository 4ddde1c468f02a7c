"""Python clients: the same methods over ZeroMQ (straight to the broker) or over HTTP.

Both are safe to use from many threads: each thread gets its own socket or connection.

    client = ZMQClient("tcp://127.0.0.1:5555")        # or HTTPClient("http://127.0.0.1:8000")
    inst = client.start_instance({"type": "local"})
    print(client.execute(inst["instance_id"], "echo hi")["output"])
    client.close_instance(inst["instance_id"])

The methods are declared once, in `Calls`: each builds a `Call` (message type, fields, how long to
wait, how to shape the result). `Client` here runs a call on a blocking transport;
`arservice.aio` runs the same calls on asyncio transports.
"""

import base64
import functools
import http.client
import inspect
import itertools
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import curve, protocol
from .protocol import BYTES_IN, BYTES_OUT, PATHS, ROUTES, Message, ServiceError

# An answer's result, as decoded (msgpack or JSON).
Result = dict[str, Any]

# How long a client waits beyond a command's own time limit, and for anything else.
EXECUTE_MARGIN_S = 30.0
DEFAULT_WAIT_S = 600.0
# How often keep_alive renews: well inside any sensible --idle-timeout.
KEEP_ALIVE_S = 60.0
# A client with no connection to the service this long answers `unavailable` (it does not wait out the call).
CONNECT_WAIT_S = 3.0
# ZMTP heartbeats: a broker that stops answering them (its process stopped, its host gone) is disconnected.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
LINK_EVENTS = zmq.EVENT_DISCONNECTED | curve.Handshakes.EVENTS
# Requests a client may send again when their answer was lost: they change nothing, or only renew.
IDEMPOTENT = {protocol.PING, protocol.RESOURCES, protocol.INSTANCES, protocol.STATUS, protocol.METRICS,
              protocol.READ_FILE, protocol.RENEW}
RETRY_PAUSE_S = 0.2


def _as_is(result: Any) -> Any:
    return result


def _seconds(value: Any) -> float | None:
    """A number of seconds the service takes; None for what it refuses (at once, so no wait depends on it)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= protocol.MAX_SECONDS
    return float(value) if ok else None


def wait_budget(kind: str, fields: dict[str, Any]) -> float:
    """How long a client waits for the answer to a request: the one rule for every client, the HTTP
    front end (a client of the broker) included. A command gets its own time limit and a margin; a
    start, the time it may wait for room; a fork, two starts' worth."""
    if kind in (protocol.EXECUTE, protocol.RUN_IN_SESSION):
        return (_seconds(fields.get("timeout")) or DEFAULT_WAIT_S) + EXECUTE_MARGIN_S
    if kind == protocol.START_INSTANCE:
        return DEFAULT_WAIT_S + (_seconds(fields.get("wait_s")) or 0.0)
    if kind == protocol.FORK_INSTANCE:
        return DEFAULT_WAIT_S * 2
    return DEFAULT_WAIT_S


@dataclass(frozen=True)
class Call:
    """One request as the clients send it: the message type, its fields, and what to make of the result."""

    kind: str
    fields: dict[str, Any]
    finish: Callable[[Any], Any] = _as_is

    @property
    def wait_s(self) -> float:
        return wait_budget(self.kind, self.fields)


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _decode_output(result: Result) -> Result:
    result["output"] = result["output"].decode("utf-8", errors="replace")
    return result


class Calls:
    """Every client method, declared once; `client_methods` turns them into sync or async methods."""

    @staticmethod
    def start_instance(environment: str | dict[str, Any], wait_s: float | None = None) -> Call:
        """environment: a preset name or a spec such as {"type": "local"}; wait_s: how long the start may
        wait for room (first come, first served) before it fails with no_capacity (default: the service's)."""
        return Call(protocol.START_INSTANCE, _present({"environment": environment, "wait_s": wait_s}))

    @staticmethod
    def renew(instance_id: str, ttl: float | None = None) -> Call:
        """Keep an instance: its idle clock starts again; ttl: its hard lifetime becomes that many seconds from now."""
        return Call(protocol.RENEW, _present({"instance_id": instance_id, "ttl": ttl}))

    @staticmethod
    def execute(instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                env: dict[str, str] | None = None, output_limit: int | None = None, raw: bool = False) -> Call:
        """Run a shell command; `output` is text, or bytes with raw=True."""
        fields = {"instance_id": instance_id, "command": command, "timeout": timeout, "cwd": cwd,
                  "env": env, "output_limit": output_limit}
        return Call(protocol.EXECUTE, _present(fields), _as_is if raw else _decode_output)

    @staticmethod
    def create_session(instance_id: str, session: str | None = None, shell: str | None = None) -> Call:
        """Start a persistent bash in the instance (cwd, variables, functions persist between its
        commands); session: its name ("default"); shell: the bash to run ("bash")."""
        return Call(protocol.CREATE_SESSION, _present({"instance_id": instance_id, "session": session, "shell": shell}))

    @staticmethod
    def run_in_session(instance_id: str, session: str, command: str, timeout: float | None = None,
                       output_limit: int | None = None, raw: bool = False) -> Call:
        """Run a command in a session's bash; `output` is text, or bytes with raw=True. A timeout
        interrupts the command (and what it started) and the session stays usable."""
        fields = {"instance_id": instance_id, "session": session, "command": command, "timeout": timeout,
                  "output_limit": output_limit}
        return Call(protocol.RUN_IN_SESSION, _present(fields), _as_is if raw else _decode_output)

    @staticmethod
    def close_session(instance_id: str, session: str) -> Call:
        return Call(protocol.CLOSE_SESSION, {"instance_id": instance_id, "session": session})

    @staticmethod
    def write_file(instance_id: str, path: str, content: str | bytes, mode: int = 0o644) -> Call:
        content = content.encode() if isinstance(content, str) else content
        return Call(protocol.WRITE_FILE, {"instance_id": instance_id, "path": path, "content": content, "mode": mode})

    @staticmethod
    def read_file(instance_id: str, path: str, limit: int | None = None) -> Call:
        """The file's bytes."""
        return Call(protocol.READ_FILE, _present({"instance_id": instance_id, "path": path, "limit": limit}),
                    finish=lambda result: result["content"])

    @staticmethod
    def fork_instance(instance_id: str, count: int = 1) -> Call:
        """`count` new instances on the same agent whose files are copies of this one's now; the
        answer's `instances` are as start_instance's answers."""
        return Call(protocol.FORK_INSTANCE, {"instance_id": instance_id, "count": count})

    @staticmethod
    def snapshot_instance(instance_id: str, name: str) -> Call:
        """Keep a copy of the instance's files as they are now, under `name`: a spec with
        "snapshot": name starts from it (on the same agent), until delete_snapshot."""
        return Call(protocol.SNAPSHOT_INSTANCE, {"instance_id": instance_id, "name": name})

    @staticmethod
    def delete_snapshot(name: str) -> Call:
        return Call(protocol.DELETE_SNAPSHOT, {"name": name})

    @staticmethod
    def close_instance(instance_id: str) -> Call:
        return Call(protocol.CLOSE_INSTANCE, {"instance_id": instance_id})

    @staticmethod
    def available_resources() -> Call:
        return Call(protocol.RESOURCES, {})

    @staticmethod
    def instances(state: str | None = None, agent_id: str | None = None, env_type: str | None = None,
                  limit: int | None = None, after: str | None = None) -> Call:
        """The instances matching every filter given, in instance id order; with `limit`, one page of
        them: pass the last one's instance_id as `after` for the next page."""
        fields = {"state": state, "agent_id": agent_id, "env_type": env_type, "limit": limit, "after": after}
        return Call(protocol.INSTANCES, _present(fields), finish=lambda result: result["instances"])

    @staticmethod
    def status() -> Call:
        """Agents, every instance, the runner's report and recent errors: what the status page shows."""
        return Call(protocol.STATUS, {})

    @staticmethod
    def ping() -> Call:
        return Call(protocol.PING, {})


METHODS = [name for name in vars(Calls) if not name.startswith("_")]


_C = TypeVar("_C", bound=type[Any])


def client_methods(cls: _C) -> _C:
    """Class decorator: give `cls` one method per entry of `Calls`, each running its Call through
    `cls._run` (a plain method, or a coroutine function for asyncio clients)."""
    is_async = inspect.iscoroutinefunction(cls._run)
    for name in METHODS:
        build = getattr(Calls, name)
        if is_async:
            async def method(self: Any, *args: Any, _build: Callable[..., Call] = build, **kwargs: Any) -> Any:
                return await self._run(_build(*args, **kwargs))
        else:
            def method(self: Any, *args: Any, _build: Callable[..., Call] = build, **kwargs: Any) -> Any:  # type: ignore[misc]  # the sync variant of the same method
                return self._run(_build(*args, **kwargs))
        method = functools.wraps(build)(method)
        method.__qualname__ = f"{cls.__name__}.{name}"
        # The signature users see: the declaration's parameters after self, and no `-> Call`.
        declared = inspect.signature(build)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        method.__signature__ = declared.replace(  # type: ignore[attr-defined]  # inspect.signature reads it
            parameters=[self_param, *declared.parameters.values()], return_annotation=inspect.Signature.empty)
        setattr(cls, name, method)
    return cls


def stream_methods(cls: _C) -> _C:
    """Class decorator: execute_stream and run_in_session_stream, each `cls._stream(call)` (an iterator,
    or an async iterator for asyncio clients) of bytes chunks and then the answer."""
    def execute_stream(self: Any, instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                       env: dict[str, str] | None = None, output_limit: int | None = None, raw: bool = False) -> Any:
        """execute, with the output as it comes: yields bytes chunks, then the answer execute gives."""
        return self._stream(Calls.execute(instance_id, command, timeout, cwd, env, output_limit, raw))

    def run_in_session_stream(self: Any, instance_id: str, session: str, command: str, timeout: float | None = None,
                              output_limit: int | None = None, raw: bool = False) -> Any:
        """run_in_session, with the output as it comes: yields bytes chunks, then its answer."""
        return self._stream(Calls.run_in_session(instance_id, session, command, timeout, output_limit, raw))
    cls.execute_stream = execute_stream
    cls.run_in_session_stream = run_in_session_stream
    return cls


@stream_methods
@client_methods
class Client:
    """The methods both transports share; subclasses provide `_call(kind, wait_s, fields)`."""

    def _run(self, call: Call) -> Any:
        return call.finish(self._call(call.kind, call.wait_s, dict(call.fields)))

    if TYPE_CHECKING:  # what subclasses provide, and what client_methods and stream_methods add (from Calls)
        def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any: ...
        def _stream(self, call: Call) -> Iterator[Any]: ...
        def start_instance(self, environment: str | dict[str, Any], wait_s: float | None = None) -> Result: ...
        def renew(self, instance_id: str, ttl: float | None = None) -> Result: ...
        def execute(self, instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                    env: dict[str, str] | None = None, output_limit: int | None = None, raw: bool = False) -> Result: ...
        def create_session(self, instance_id: str, session: str | None = None, shell: str | None = None) -> Result: ...
        def run_in_session(self, instance_id: str, session: str, command: str, timeout: float | None = None,
                           output_limit: int | None = None, raw: bool = False) -> Result: ...
        def close_session(self, instance_id: str, session: str) -> Result: ...
        def write_file(self, instance_id: str, path: str, content: str | bytes, mode: int = 0o644) -> Result: ...
        def read_file(self, instance_id: str, path: str, limit: int | None = None) -> bytes: ...
        def fork_instance(self, instance_id: str, count: int = 1) -> Result: ...
        def snapshot_instance(self, instance_id: str, name: str) -> Result: ...
        def delete_snapshot(self, name: str) -> Result: ...
        def close_instance(self, instance_id: str) -> Result: ...
        def available_resources(self) -> Result: ...
        def instances(self, state: str | None = None, agent_id: str | None = None, env_type: str | None = None,
                      limit: int | None = None, after: str | None = None) -> list[Result]: ...
        def status(self) -> Result: ...
        def ping(self) -> Result: ...
        def execute_stream(self, instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                           env: dict[str, str] | None = None, output_limit: int | None = None,
                           raw: bool = False) -> Iterator[Any]: ...
        def run_in_session_stream(self, instance_id: str, session: str, command: str, timeout: float | None = None,
                                  output_limit: int | None = None, raw: bool = False) -> Iterator[Any]: ...

    def keep_alive(self, *instance_ids: str, every_s: float = KEEP_ALIVE_S) -> "KeepAlive":
        """Renew these instances from a background thread until stopped (use it as a context manager),
        so that they outlive --idle-timeout while this process lives, and no longer once it died."""
        return KeepAlive(self, instance_ids, every_s)


class KeepAlive:
    """A daemon thread renewing a set of instances; add() and discard() change the set."""

    def __init__(self, client: Client, instance_ids: Iterable[str], every_s: float) -> None:
        self.client = client
        self.instance_ids = set(instance_ids)
        self.every_s = every_s
        self.errors: dict[str, Exception] = {}  # the last renewal error of each instance
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_all, name="arservice-keep-alive", daemon=True)
        self._thread.start()

    def add(self, instance_id: str) -> None:
        self.instance_ids.add(instance_id)

    def discard(self, instance_id: str) -> None:
        self.instance_ids.discard(instance_id)

    def _renew_all(self) -> None:
        while not self._stop.wait(self.every_s):
            for instance_id in list(self.instance_ids):
                try:
                    self.client.renew(instance_id)
                    self.errors.pop(instance_id, None)
                except (ServiceError, OSError) as exc:  # the next request on it says so too; keep the others alive
                    self.errors[instance_id] = exc
                    if getattr(exc, "code", None) in ("not_found", "expired", "agent_lost"):
                        self.instance_ids.discard(instance_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "KeepAlive":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- ZeroMQ: what the sync and async ZMQ clients share ---

def zmq_frames(kind: str, msg_id: int, fields: dict[str, Any], token: str | None) -> list[bytes | memoryview]:
    """A request as the frames to send: with a token, several when it is larger than the broker's frame
    limit (protocol.MAX_FRAME_BYTES); without one, the broker takes any frame and it stays whole."""
    if not token:
        return [protocol.encode(protocol.request(kind, msg_id, **fields))]
    return protocol.split(protocol.encode(protocol.request(kind, msg_id, token=token, **fields)))


def zmq_result(answer: Message) -> Any:
    """The result of a decoded answer, or its error raised as ServiceError."""
    if answer["type"] == protocol.ERROR:
        raise ServiceError(answer["error"]["code"], answer["error"]["message"])
    return answer["result"]


def no_answer(where: str, wait_s: float) -> ServiceError:
    return ServiceError("timeout", f"no answer from {where} within {wait_s:.0f}s")


def unreachable_service(where: str) -> ServiceError:
    return ServiceError("unavailable", f"no connection to {where} for {CONNECT_WAIT_S:g}s")


def connection_dropped(where: str) -> ServiceError:
    return ServiceError("unavailable", f"the connection to {where} dropped while waiting: the request may or may "
                                       "not have been carried out")


def may_send_again(kind: str, exc: ServiceError) -> bool:
    """Whether a request that failed so is safe to send again: it never reached an agent (a broker
    that just restarted does not know the instance yet), or it changes nothing and its answer was lost."""
    if exc.code != "unavailable":
        return False
    return exc.message.startswith("no instance") or (kind in IDEMPOTENT and exc.message.startswith("the connection"))


_S = TypeVar("_S", bound=zmq.Socket)


# The ZMQ sockets of one thread's link to a broker over TCP: the DEALER, and its monitor's two PAIR
# sockets (libzmq's end and ours). A context serving N threads needs N times this.
LINK_SOCKETS = 3
# Threads of one process that a ZMQClient without a context of its own serves at once. Each link
# also holds 4 file descriptors, so the process's RLIMIT_NOFILE must allow them too.
CLIENT_THREADS = 4096


class ClientContext(zmq.Context):
    """ZMQClient's context where it is given none, one per process (ClientContext.instance(), made
    again in a forked child). ZeroMQ's default context takes 1,023 sockets: 341 threads' links, so
    a pool of 400 threads making requests through one client had 60 fail with EMFILE."""

    def __init__(self, io_threads: int = 1) -> None:
        super().__init__(io_threads)
        self.set(zmq.MAX_SOCKETS, LINK_SOCKETS * CLIENT_THREADS + 1024)  # before its first socket: later, libzmq ignores it


def broker_socket(ctx: "zmq.Context[_S]", address: str, token: str | None) -> tuple[_S, _S | None]:
    """A DEALER to the broker with ZMTP heartbeats (and CURVE keys of the token, if any), and the
    monitor socket that says when it is connected or refused; no monitor in-process (inproc has no
    connection to lose, no handshake and no monitor events)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if address.startswith("inproc://"):
        return sock, None
    if token:
        curve.secure_client(sock, token)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock, sock.get_monitor_socket(LINK_EVENTS)


class _Link:
    """One thread's socket to the broker, and whether it is connected (from its monitor's events)."""

    def __init__(self, ctx: zmq.Context, address: str, token: str | None) -> None:
        self.address, self.token = address, token
        self.sock, self.monitor = broker_socket(ctx, address, token)
        self.sock.connect(address)
        self.connected = self.monitor is None
        self.drops = 0  # disconnections so far: an answer due on a dropped connection never comes
        self.down_since: float | None = None if self.connected else time.monotonic()
        self.handshakes = curve.Handshakes(bool(token))
        self.refused: ServiceError | None = None  # the broker refused the handshake: no request can pass

    def update(self) -> None:
        while self.monitor is not None and self.monitor.poll(0):
            message = recv_monitor_message(self.monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected, self.down_since = True, None
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected, self.down_since = False, time.monotonic()
                self.drops += 1
            refusal = self.handshakes.refusal(event, message["value"])
            if refusal is not None:
                self.refused = ServiceError("unauthorized", f"{refusal} (the broker at {self.address})")

    def close(self) -> None:
        close_socket(self.sock, self.monitor)


def close_socket(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    if monitor is not None:
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)


class ZMQClient(Client):
    """The low-latency path: msgpack over a DEALER socket straight to the broker."""

    def __init__(self, address: str, token: str | None = None, context: zmq.Context | None = None) -> None:
        self.address = address
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        self.ctx = context or ClientContext.instance()
        self._local = threading.local()
        self._sockets: dict[threading.Thread, _Link] = {}  # thread -> its socket
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _link(self) -> _Link:
        link = getattr(self._local, "link", None)
        if link is None:
            with self._lock:
                # Threads come and go (pools, one per task): close what ended ones left, or the
                # sockets pile up to ZeroMQ's limit. No other thread uses a dead thread's socket.
                for thread in [t for t in self._sockets if not t.is_alive()]:
                    self._sockets.pop(thread).close()
                link = self._local.link = _Link(self.ctx, self.address, self.token)
                self._sockets[threading.current_thread()] = link
        return link

    def _drop_link(self, link: _Link) -> None:
        """Close a refused link (its socket would retry the handshake forever); the next request makes a new one."""
        with self._lock:
            self._sockets.pop(threading.current_thread(), None)
        self._local.link = None
        link.close()

    def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        return self._request(kind, wait_s, fields)

    def request(self, kind: str, wait_s: float = DEFAULT_WAIT_S, **fields: Any) -> Any:
        """Send one message and wait for its answer; the result, or ServiceError."""
        return self._request(kind, wait_s, fields)

    def _request(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        """Send one message and wait for its answer, sending it again while that is safe and the wait
        allows: a request that never reached an agent (`unavailable` from a broker that just restarted),
        or one that changes nothing (IDEMPOTENT) whose connection dropped."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._request_once(kind, wait_s, fields)
            except ServiceError as exc:
                wait_s = deadline - time.monotonic() - RETRY_PAUSE_S
                if not may_send_again(kind, exc) or wait_s <= 0:
                    raise
                time.sleep(RETRY_PAUSE_S)

    def _request_once(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        """Send one message and wait for its answer; the result, or ServiceError (`unavailable` within
        CONNECT_WAIT_S when there is no connection to the broker, or it drops)."""
        for answer in self._answers(kind, wait_s, fields):
            if answer["type"] != protocol.CHUNK:
                return zmq_result(answer)

    def _stream(self, call: Call) -> Generator[Any, None, None]:
        for answer in self._answers(call.kind, call.wait_s, dict(call.fields, stream=True)):
            if answer["type"] == protocol.CHUNK:
                yield answer["data"]
            else:
                yield call.finish(zmq_result(answer))

    def _answers(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Iterator[Message]:
        """Send one message and yield what comes back for it: chunks (a streamed command's), then its
        answer. The wait is for the first of them, then between any two."""
        link = self._link()
        link.update()
        drops = link.drops
        msg_id = next(self._ids)
        link.sock.send_multipart(zmq_frames(kind, msg_id, fields, self.token), copy=False)  # large ones go from their own buffer
        deadline = time.monotonic() + wait_s
        poller = zmq.Poller()
        poller.register(link.sock, zmq.POLLIN)
        if link.monitor is not None:
            poller.register(link.monitor, zmq.POLLIN)
        where = f"the broker at {self.address}"
        while True:
            if link.refused is not None:
                self._drop_link(link)
                raise link.refused
            now = time.monotonic()
            if now >= deadline:
                raise no_answer(where, wait_s)
            if link.down_since is not None and now - link.down_since >= CONNECT_WAIT_S:
                raise unreachable_service(where)
            wake = deadline if link.down_since is None else min(deadline, link.down_since + CONNECT_WAIT_S)
            ready = dict(poller.poll(max(0.0, wake - now) * 1000))  # type: ignore[arg-type]  # pyzmq takes float ms
            if link.sock in ready:
                answer = protocol.decode(link.sock.recv())
                if answer.get("id") == msg_id:  # else a late answer to an earlier request that timed out
                    yield answer
                    if answer["type"] != protocol.CHUNK:
                        return
                    deadline = time.monotonic() + wait_s
            link.update()
            if link.drops != drops and link.refused is None:
                raise connection_dropped(where)

    def close(self) -> None:
        """Close every socket; call when no request is in flight."""
        with self._lock:
            for link in self._sockets.values():
                link.close()
            self._sockets.clear()


# --- HTTP: what the sync and async HTTP clients share ---

@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    body: bytes | None


def http_request(kind: str, fields: dict[str, Any]) -> HTTPRequest:
    """The HTTP request for a call; byte fields travel base64-encoded, exactly."""
    path = PATHS[kind]
    method = ROUTES[path][0]
    body = None
    if method == "GET" and fields:
        path += "?" + urllib.parse.urlencode(fields)
    if method == "POST":
        fields = dict(fields, base64=True)
        if kind in BYTES_IN:
            fields[BYTES_IN[kind]] = base64.b64encode(fields[BYTES_IN[kind]]).decode()
        body = json.dumps(fields).encode()
    return HTTPRequest(method, path, body)


def http_headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def http_result(kind: str, status: int, data: bytes) -> Any:
    """The result of an HTTP answer, or its error raised as ServiceError."""
    answer = json.loads(data) if data else {}
    if status >= 400:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        raise ServiceError(error.get("code", f"http_{status}"), error.get("message", str(answer)))
    if kind in BYTES_OUT:
        answer[BYTES_OUT[kind]] = base64.b64decode(answer[BYTES_OUT[kind]])
    return answer


def http_stream_event(call: Call, line: bytes) -> Any:
    """One JSON line of a streamed HTTP answer: a chunk's bytes, or the answer's result (finished as
    the call finishes it); an error line raises ServiceError."""
    event = json.loads(line)
    if "output" in event:
        return base64.b64decode(event["output"])
    if "error" in event:
        raise ServiceError(event["error"].get("code", "internal"), event["error"].get("message", ""))
    return call.finish(http_result(call.kind, 200, json.dumps(event["result"]).encode()))


def service_url(url: str, schemes: tuple[str, ...] = ("http",)) -> urllib.parse.SplitResult:
    """The parts of an HTTP service address; ValueError at once for one that names no host or another
    scheme ('localhost:8000' would otherwise fail only at the first request, in http.client's words)."""
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # noqa: B018 (parsing it is the check: ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"not a service URL: {url!r}: {exc}") from None
    if parsed.scheme not in schemes or not parsed.hostname:
        raise ValueError(f"not a service URL: {url!r}: give it as {' or '.join(schemes)}://HOST[:PORT], "
                         "e.g. http://127.0.0.1:8000")
    return parsed


class HTTPClient(Client):
    """The same methods over the HTTP API, with one keep-alive connection per thread."""

    def __init__(self, url: str, token: str | None = None) -> None:
        parsed = service_url(url)
        self.host, self.port = cast(str, parsed.hostname), parsed.port or 80
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        self._local = threading.local()

    def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        request = http_request(kind, fields)
        status, data = self._send(request, wait_s)
        return http_result(kind, status, data)

    def _stream(self, call: Call) -> Generator[Any, None, None]:
        """The answer comes as JSON lines ({"output": base64} chunks, then {"result"} or {"error"}) on a
        connection of its own: a stream dropped half-read never leaves a kept-alive connection mid-answer."""
        request = http_request(call.kind, dict(call.fields, stream=True))
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_WAIT_S)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise ServiceError("unavailable", f"cannot connect to {self.host}:{self.port}: {exc}") from None
            conn.sock.settimeout(call.wait_s)
            conn.request(request.method, request.path, body=request.body, headers=http_headers(self.token))
            response = conn.getresponse()
            if response.status >= 400:
                http_result(call.kind, response.status, response.read())
            for line in response:
                event = http_stream_event(call, line)
                yield event
                if not isinstance(event, bytes):
                    return
            raise connection_dropped(f"{self.host}:{self.port}")
        except TimeoutError:
            raise no_answer(f"{self.host}:{self.port}{request.path}", call.wait_s) from None
        finally:
            conn.close()

    def _send(self, request: HTTPRequest, wait_s: float) -> tuple[int, bytes]:  # type: ignore[return]  # the last attempt returns or raises
        headers = http_headers(self.token)
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one fresh retry
            conn = getattr(self._local, "conn", None)
            if conn is None or conn.sock is None:  # none yet, or the server ended it ("Connection: close")
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_WAIT_S)
                try:
                    conn.connect()
                except OSError as exc:
                    self._local.conn = None
                    raise ServiceError("unavailable", f"cannot connect to {self.host}:{self.port}: {exc}") from None
            conn.sock.settimeout(wait_s)
            try:
                conn.request(request.method, request.path, body=request.body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise connection_dropped(f"{self.host}:{self.port}") from None
            except TimeoutError as err:
                conn.close()
                self._local.conn = None
                raise no_answer(f"{self.host}:{self.port}{request.path}", wait_s) from err
