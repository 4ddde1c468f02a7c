"""The Falcon front end: JSON over HTTP in, protocol messages to the broker loop over inproc.

It checks the bearer token (in middleware, before a body is read) and parses JSON, nothing
more: every field is validated by the broker, so HTTP and ZMQ clients get the same answers to
the same mistakes.

Each request in flight holds one waitress thread while the broker works on it (a command may
run for an hour), so the server has threads for every command a fleet keeps in flight, and
connections for every client.
"""

import base64
import codecs
import json
import math
import threading
from collections.abc import Generator, Iterator, Mapping
from typing import Any, NoReturn

import falcon
import waitress
import zmq

from .. import protocol
from ..broker import INPROC_ADDRESS
from ..client import Call, ZMQClient
from ..logs import EventLog
from ..protocol import BYTES_IN, BYTES_OUT, DEFAULT_MAX_BODY_BYTES, MAX_INT, PATHS, QUERY_INTS, ROUTES, ServiceError
from . import observe, openapi

log = EventLog("http")

STATUS_CODES = {404: "not_found", 413: "payload_too_large", 401: "unauthorized"}
# Sized for rollout fleets: a thread per request in flight (commands can be long), and
# connections for every client's keep-alive connection.
DEFAULT_THREADS = 1500
DEFAULT_CONNECTIONS = 2000
DEFAULT_IDLE_TIMEOUT_S = 300.0
# Health, the API's description, and the status page's own files (they hold no data: the page
# asks for the token and sends it with every API call, /status and /metrics included).
UNGUARDED_PATHS = {PATHS[protocol.PING], "/", "/api", "/openapi.json"}
UNGUARDED_PREFIX = "/static/"
# What json_pieces converts at a time: a multiple of 3, so the base64 of the pieces joins up.
PIECE_BYTES = 3 << 18


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


class Authorization:
    """Falcon middleware: the bearer token is checked before anything reads the request body."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.token and req.path not in UNGUARDED_PATHS and not req.path.startswith(UNGUARDED_PREFIX):
            presented = (req.get_header("Authorization") or "").removeprefix("Bearer ").strip()
            if not protocol.same_secret(presented, self.token):
                raise ServiceError("unauthorized", "missing or wrong bearer token")


def _bad_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows here")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if not -MAX_INT <= value <= MAX_INT:
        raise ValueError(f"integer {text[:40]} does not fit in 64 bits")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object with only finite numbers that fit in 64 bits; invalid_request otherwise.

    The bytes are decoded here, as json.loads would, so that they can be let go before parsing:
    a 64 MiB write_file is held twice at most, not four times. The caller keeps no reference."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass") if raw else "{}"
    except UnicodeDecodeError as exc:
        raise ServiceError("invalid_request", f"request body is not valid JSON: {exc}") from None
    del raw
    try:
        body = json.loads(text, parse_constant=_bad_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ServiceError("invalid_request", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ServiceError("invalid_request", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ServiceError("invalid_request", "request body must be a JSON object")
    return body


def query_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """A GET's query parameters as message fields: text, but the QUERY_INTS as integers (the broker
    checks every field as it does a ZMQ client's)."""
    fields = dict(params)
    for name in QUERY_INTS & fields.keys():
        try:
            fields[name] = _bounded_int(fields[name])
        except (TypeError, ValueError):
            raise ServiceError("invalid_request", f"query parameter '{name}' must be an integer") from None
    return fields


class Endpoint:
    """One route, sent on to the broker as its message; a subclass below has its one responder, so
    Falcon answers other methods with 405."""

    def __init__(self, kind: str, broker: ZMQClient, max_body: int) -> None:
        self.kind = kind
        self.broker = broker
        self.max_body = max_body

    def _serve(self, req: falcon.Request, resp: falcon.Response, body: dict[str, Any]) -> None:
        use_base64 = body.pop("base64", False) is True
        fields = {k: v for k, v in body.items() if k not in ("v", "type", "id", "token")}
        del body  # here and below: a large payload is let go as soon as it has been converted
        if self.kind in BYTES_IN and use_base64 and isinstance(fields.get(BYTES_IN[self.kind]), str):
            try:
                fields[BYTES_IN[self.kind]] = base64.b64decode(fields[BYTES_IN[self.kind]], validate=True)
            except ValueError as err:  # binascii.Error, or a non-ASCII string
                raise ServiceError("invalid_request", f"field '{BYTES_IN[self.kind]}' is not valid base64") from err
        if fields.get("stream") is True and self.kind in protocol.STREAMABLE:
            resp.content_type = "application/x-ndjson"
            resp.stream = stream_lines(self.broker._stream(Call(self.kind, fields)),
                                       BYTES_OUT[self.kind], use_base64)
            return
        fields.pop("stream", None)
        # The fields go as a dict: one named like request()'s own parameters (a start's wait_s) is still a field.
        result = self.broker._run(Call(self.kind, fields))
        del fields
        if self.kind == protocol.PING:
            result["status"] = "ok"
        resp.stream = json_pieces(result, BYTES_OUT.get(self.kind), use_base64)
        resp.content_length = sum(len(piece) for piece in resp.stream)


class GetEndpoint(Endpoint):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp, query_fields(req.params))


class PostEndpoint(Endpoint):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp, parse_body(self._body(req)))  # neither is kept here: _serve lets them go

    def _body(self, req: falcon.Request) -> bytes:
        too_large = ServiceError("payload_too_large", f"request body is larger than {self.max_body} bytes")
        if req.content_length is not None and req.content_length > self.max_body:
            raise too_large
        raw: bytes = req.bounded_stream.read(self.max_body + 1)
        if len(raw) > self.max_body:
            raise too_large
        return raw

def json_pieces(result: dict[str, Any], out: str | None, use_base64: bool) -> list[bytes]:
    """An answer as the pieces of its JSON text, its bytes field `out` (an output or a file) last,
    as text (UTF-8, invalid bytes replaced) or base64. The bytes are converted a piece at a time,
    so a 64 MiB output is held about twice, not five times over (text, escaped, joined, encoded)."""
    data = result.pop(out, None) if out else None
    # A NaN would make the answer invalid JSON: the broker never sends one, and this makes sure.
    rest = json.dumps(result, allow_nan=False)
    if not isinstance(data, bytes):
        return [rest.encode()]
    pieces = [f'{rest[:-1]}{", " if result else ""}{json.dumps(out)}: "'.encode()]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may straddle two pieces
    with memoryview(data) as view:
        for start in range(0, len(data), PIECE_BYTES):
            chunk = view[start:start + PIECE_BYTES]
            pieces.append(base64.b64encode(chunk) if use_base64 else
                          json.dumps(decoder.decode(chunk, final=start + PIECE_BYTES >= len(data)))[1:-1].encode())
    pieces.append(b'"}')
    return pieces


def stream_lines(events: Generator[Any, None, None], out: str, use_base64: bool) -> Iterator[bytes]:
    """A streamed answer as JSON lines, sent chunked as they come: {"output": ...} for each chunk of
    output, then {"result": ...} (or {"error": ...} if it fails on the way). When the client goes
    away, waitress closes this generator, which closes the broker's stream."""
    def text(data: bytes) -> str:
        return base64.b64encode(data).decode() if use_base64 else data.decode("utf-8", errors="replace")
    try:
        for event in events:
            if isinstance(event, bytes):
                yield json.dumps({"output": text(event)}).encode() + b"\n"
            else:
                event[out] = text(event[out])
                yield json.dumps({"result": event}, allow_nan=False).encode() + b"\n"
    except ServiceError as exc:
        yield json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode() + b"\n"
    finally:
        events.close()


def _service_error(req: falcon.Request, resp: falcon.Response, exc: ServiceError,
                   params: dict[str, Any]) -> None:
    resp.status = falcon.code_to_http_status(protocol.ERROR_CODES.get(exc.code, 500))
    resp.content_type = falcon.MEDIA_JSON
    resp.text = error_body(exc.code, exc.message)


def _http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: dict[str, Any]) -> None:
    status = falcon.http_status_to_code(exc.status)
    resp.status = exc.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = error_body(STATUS_CODES.get(status, "invalid_request"), exc.title + (f": {exc.description}" if exc.description else ""))


def create_app(context: zmq.Context, token: str | None = None, max_body: int = DEFAULT_MAX_BODY_BYTES,
               broker_address: str = INPROC_ADDRESS) -> falcon.App:
    """The app, a client of the broker: over inproc in the broker's process, over loopback in a worker."""
    broker = ZMQClient(broker_address, token=token or "", context=context)
    app = falcon.App(middleware=[Authorization(token)])
    for path, (method, kind) in ROUTES.items():
        app.add_route(path, (GetEndpoint if method == "GET" else PostEndpoint)(kind, broker, max_body))
    observe.add_routes(app, broker)
    openapi.add_routes(app)
    app.add_error_handler(ServiceError, _service_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    return app


class HTTPServer:
    """waitress serving the app on its own threads, stoppable from another thread."""

    def __init__(self, app: falcon.App, host: str | None = None, port: int | None = None, threads: int = DEFAULT_THREADS,
                 max_body: int = DEFAULT_MAX_BODY_BYTES, connections: int = DEFAULT_CONNECTIONS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, sockets: list[Any] | None = None) -> None:
        # On host and port, or on listening sockets made elsewhere (a worker's, inherited).
        where = {"sockets": sockets} if sockets is not None else {"host": host, "port": port}
        # waitress's own limit is a backstop for chunked bodies; the app answers 413 in JSON first.
        # poll(), not select(): past 1023 descriptors select() fails.
        self.server = waitress.create_server(  # type: ignore[attr-defined]  # waitress exports it; its stubs miss it
            app, **where, threads=threads, max_request_body_size=2 * max_body,
            connection_limit=connections, channel_timeout=idle_timeout_s, asyncore_use_poll=True,
            ident="arservice",
        )
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("http_started", host=self.server.effective_host, port=self.port)

    def stop(self) -> None:
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
