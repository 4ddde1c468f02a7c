"""asyncio clients: the methods of arservice.client (declared once there, in `Calls`), as coroutines.

One client serves thousands of coroutines of one event loop at once:

    client = AsyncZMQClient("tcp://127.0.0.1:5555")   # or AsyncHTTPClient("http://127.0.0.1:8000")
    inst = await client.start_instance({"type": "local"})
    results = await asyncio.gather(*(client.execute(inst["instance_id"], f"echo {i}") for i in range(1000)))
    await client.close_instance(inst["instance_id"])
    await client.aclose()

`AsyncZMQClient` keeps one DEALER socket and one reader task per event loop: every request
carries its own id, and the reader hands each answer to the coroutine waiting on that id.
`AsyncHTTPClient` uses aiohttp's connection pool (keep-alive, at most `max_connections` at
once; the others wait their turn, which counts against their wait budget only once they are sent).
"""

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import curve, protocol
from .client import (
    CONNECT_WAIT_S,
    DEFAULT_WAIT_S,
    RETRY_PAUSE_S,
    Call,
    Result,
    ServiceError,
    broker_socket,
    client_methods,
    close_socket,
    connection_dropped,
    http_headers,
    http_request,
    http_result,
    http_stream_event,
    may_send_again,
    no_answer,
    service_url,
    stream_methods,
    unreachable_service,
    zmq_frames,
    zmq_result,
)


@stream_methods
@client_methods
class AsyncClient:
    """The methods of arservice.client.Client as coroutines; subclasses provide `async _call`."""

    async def _run(self, call: Call) -> Any:
        return call.finish(await self._call(call.kind, call.wait_s, dict(call.fields)))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    if TYPE_CHECKING:  # what subclasses provide, and what client_methods and stream_methods add (from Calls)
        async def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any: ...
        def _stream(self, call: Call) -> AsyncIterator[Any]: ...
        async def aclose(self) -> None: ...
        async def start_instance(self, environment: str | dict[str, Any], wait_s: float | None = None) -> Result: ...
        async def renew(self, instance_id: str, ttl: float | None = None) -> Result: ...
        async def execute(self, instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                          env: dict[str, str] | None = None, output_limit: int | None = None,
                          raw: bool = False) -> Result: ...
        async def create_session(self, instance_id: str, session: str | None = None,
                                 shell: str | None = None) -> Result: ...
        async def run_in_session(self, instance_id: str, session: str, command: str, timeout: float | None = None,
                                 output_limit: int | None = None, raw: bool = False) -> Result: ...
        async def close_session(self, instance_id: str, session: str) -> Result: ...
        async def write_file(self, instance_id: str, path: str, content: str | bytes, mode: int = 0o644) -> Result: ...
        async def read_file(self, instance_id: str, path: str, limit: int | None = None) -> bytes: ...
        async def fork_instance(self, instance_id: str, count: int = 1) -> Result: ...
        async def snapshot_instance(self, instance_id: str, name: str) -> Result: ...
        async def delete_snapshot(self, name: str) -> Result: ...
        async def close_instance(self, instance_id: str) -> Result: ...
        async def available_resources(self) -> Result: ...
        async def instances(self, state: str | None = None, agent_id: str | None = None, env_type: str | None = None,
                            limit: int | None = None, after: str | None = None) -> list[Result]: ...
        async def status(self) -> Result: ...
        async def ping(self) -> Result: ...
        def execute_stream(self, instance_id: str, command: str, timeout: float | None = None, cwd: str | None = None,
                           env: dict[str, str] | None = None, output_limit: int | None = None,
                           raw: bool = False) -> AsyncIterator[Any]: ...
        def run_in_session_stream(self, instance_id: str, session: str, command: str, timeout: float | None = None,
                                  output_limit: int | None = None, raw: bool = False) -> AsyncIterator[Any]: ...


class _Channel:
    """One DEALER socket of one event loop, the reader task that routes answers by id, and the
    watcher task that fails the waiting requests when the connection drops (their answers cannot come)."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, token: str | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.address = address
        self.sock, self.monitor = broker_socket(ctx, address, token)
        self.connected = asyncio.Event()
        self.handshakes = curve.Handshakes(bool(token))
        self.refused: ServiceError | None = None  # the broker refused the handshake: no request can pass
        # Thousands of requests may be queued at once: let them all wait in ZeroMQ, not in send().
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        # By request id (an int; looked up by whatever id an answer carries).
        self.waiting: dict[Any, asyncio.Future[Any]] = {}
        self.streams: dict[Any, asyncio.Queue[Any]] = {}  # a streamed request's messages, in order
        self.reader = self.loop.create_task(self._read())
        self.watcher: asyncio.Task[None] | None = None
        if self.monitor is None:
            self.connected.set()
        else:
            self.watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            monitor = cast(zmq.asyncio.Socket, self.monitor)  # watched only with a monitor
            message = parse_monitor_message(await monitor.recv_multipart())
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event == zmq.EVENT_DISCONNECTED and self.connected.is_set():
                self.connected.clear()
                self._fail_waiting(connection_dropped(f"the broker at {self.address}"))
            refusal = self.handshakes.refusal(event, message["value"])
            if refusal is not None:
                self.refused = ServiceError("unauthorized", f"{refusal} (the broker at {self.address})")
                self._fail_waiting(self.refused)
                self.connected.set()  # wakes the requests waiting for a connection, to fail with the refusal
                return

    def _fail_waiting(self, exc: Exception) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(exc)
        for queue in self.streams.values():
            queue.put_nowait(exc)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.sock.recv()
                try:
                    answer = protocol.decode(frame)
                except protocol.ServiceError:
                    continue  # not an answer of ours: nobody waits for it
                queue = self.streams.get(answer.get("id"))
                if queue is not None:
                    queue.put_nowait(answer)
                    continue
                future = self.waiting.pop(answer.get("id"), None)
                if future is not None and not future.done():  # else a late answer to a request that timed out
                    future.set_result(answer)
        except Exception as exc:  # the socket broke: nobody may wait for an answer that cannot come
            self._fail_waiting(exc)
            raise

    async def request(self, frames: list[bytes | memoryview], msg_id: int, wait_s: float) -> Any:
        if not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), min(wait_s, CONNECT_WAIT_S))
            except asyncio.TimeoutError:
                if wait_s <= CONNECT_WAIT_S:  # the caller's budget ran out first
                    raise asyncio.TimeoutError from None
                raise unreachable_service(f"the broker at {self.address}") from None
        if self.refused is not None:
            raise self.refused
        future = self.loop.create_future()
        self.waiting[msg_id] = future
        try:
            await self.sock.send_multipart(frames, copy=False)
            return await asyncio.wait_for(future, wait_s)
        finally:
            self.waiting.pop(msg_id, None)

    async def stream(self, frames: list[bytes | memoryview], msg_id: int, wait_s: float) -> AsyncIterator[Any]:
        """Send a streamed request; yield its chunk messages, then its answer (each within wait_s of the last)."""
        if not self.connected.is_set():
            await self.request_ready(wait_s)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams[msg_id] = queue
        try:
            await self.sock.send_multipart(frames, copy=False)
            while True:
                answer = await asyncio.wait_for(queue.get(), wait_s)
                if isinstance(answer, Exception):
                    raise answer
                yield answer
                if answer["type"] != protocol.CHUNK:
                    return
        finally:
            self.streams.pop(msg_id, None)

    async def request_ready(self, wait_s: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), min(wait_s, CONNECT_WAIT_S))
        except asyncio.TimeoutError:
            raise unreachable_service(f"the broker at {self.address}") from None

    async def close(self) -> None:
        for task in (self.reader, self.watcher):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        close_socket(self.sock, self.monitor)


class AsyncZMQClient(AsyncClient):
    """The low-latency path from asyncio: msgpack over one DEALER socket per event loop."""

    def __init__(self, address: str, token: str | None = None, context: zmq.asyncio.Context | None = None) -> None:
        self.address = address
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        self.ctx = context or zmq.asyncio.Context.instance()
        self._channel: _Channel | None = None
        self._ids = itertools.count(1)

    def _channel_here(self) -> _Channel:
        # A socket belongs to the loop it was made in (asyncio.run twice makes two loops); a
        # channel whose reader ended (its socket broke) is replaced.
        # A refused one is replaced too: its socket would retry the handshake forever.
        channel = self._channel
        if (channel is None or channel.loop is not asyncio.get_running_loop() or channel.reader.done()
                or channel.refused is not None):
            if channel is not None:
                if not channel.loop.is_closed():
                    channel.reader.cancel()
                close_socket(channel.sock, channel.monitor)  # its loop is gone or its reader ended: nothing reads it
            channel = self._channel = _Channel(self.ctx, self.address, self.token)
        return channel

    async def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        return await self._request(kind, wait_s, fields)

    async def request(self, kind: str, wait_s: float = DEFAULT_WAIT_S, **fields: Any) -> Any:
        """Send one message and wait for its answer; the result, or ServiceError."""
        return await self._request(kind, wait_s, fields)

    async def _request(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        """One request, sent again while that is safe and the wait allows (as the sync client does)."""
        deadline = self._loop_time() + wait_s
        while True:
            try:
                return await self._request_once(kind, wait_s, fields)
            except ServiceError as exc:
                wait_s = deadline - self._loop_time() - RETRY_PAUSE_S
                if not may_send_again(kind, exc) or wait_s <= 0:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _request_once(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        msg_id = next(self._ids)
        try:
            answer = await self._channel_here().request(zmq_frames(kind, msg_id, fields, self.token), msg_id, wait_s)
        except asyncio.TimeoutError:
            raise no_answer(f"the broker at {self.address}", wait_s) from None
        return zmq_result(answer)

    async def _stream(self, call: Call) -> AsyncIterator[Any]:
        msg_id = next(self._ids)
        frames = zmq_frames(call.kind, msg_id, dict(call.fields, stream=True), self.token)
        try:
            async for answer in self._channel_here().stream(frames, msg_id, call.wait_s):
                yield answer["data"] if answer["type"] == protocol.CHUNK else call.finish(zmq_result(answer))
        except asyncio.TimeoutError:
            raise no_answer(f"the broker at {self.address}", call.wait_s) from None

    async def aclose(self) -> None:
        """Close the socket; call from the loop that used it, when no request is in flight."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class AsyncHTTPClient(AsyncClient):
    """The same methods over the HTTP API, through one aiohttp connection pool per event loop."""

    def __init__(self, url: str, token: str | None = None, max_connections: int = 64) -> None:
        service_url(url, schemes=("http", "https"))  # aiohttp speaks TLS too
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("ARSERVICE_TOKEN")
        # The service serves 64 requests at once by default (--http-threads); more connections
        # would only queue there. Waiting for a free connection has no limit of its own.
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self) -> aiohttp.ClientSession:
        # Connections belong to the loop they were opened in, as ZeroMQ sockets do.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                self.url, headers=http_headers(self.token), connector=aiohttp.TCPConnector(limit=self.max_connections))
            self._session_loop = loop
        return self._session

    async def _call(self, kind: str, wait_s: float, fields: dict[str, Any]) -> Any:
        request = http_request(kind, fields)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(wait_s, CONNECT_WAIT_S), sock_read=wait_s)
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one fresh retry
            try:
                async with self._session_here().request(request.method, request.path, data=request.body,
                                                        timeout=timeout) as response:
                    return http_result(kind, response.status, await response.read())
            except aiohttp.ServerDisconnectedError:
                if attempt == 2:
                    raise connection_dropped(self.url) from None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise ServiceError("unavailable", f"cannot connect to {self.url}: {exc}") from None
            except asyncio.TimeoutError:
                raise no_answer(f"{self.url}{request.path}", wait_s) from None

    async def _stream(self, call: Call) -> AsyncIterator[Any]:
        request = http_request(call.kind, dict(call.fields, stream=True))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(call.wait_s, CONNECT_WAIT_S), sock_read=call.wait_s)
        try:
            async with self._session_here().request(request.method, request.path, data=request.body,
                                                    timeout=timeout) as response:
                if response.status >= 400:
                    http_result(call.kind, response.status, await response.read())
                pending = b""  # lines are split here: aiohttp's readline refuses lines past 512 KiB
                async for data in response.content.iter_any():
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        event = http_stream_event(call, line)
                        yield event
                        if not isinstance(event, bytes):
                            return
                raise connection_dropped(self.url)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ServiceError("unavailable", f"cannot connect to {self.url}: {exc}") from None
        except asyncio.TimeoutError:
            raise no_answer(f"{self.url}{request.path}", call.wait_s) from None

    async def aclose(self) -> None:
        """Close the connections; call from the loop that used them, when no request is in flight."""
        if self._session is not None and self._session_loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None


__all__ = ["AsyncClient", "AsyncHTTPClient", "AsyncZMQClient", "ServiceError"]
