"""The Falcon front end: JSON over HTTP in, protocol messages to the broker loop over inproc.

It parses JSON and checks the bearer token, nothing more: every field is validated by the
broker, so HTTP and ZMQ clients get the same answers to the same mistakes.
"""

import base64
import binascii
import hmac
import json
import threading

import falcon
import waitress

from .. import protocol
from ..broker import INPROC_ADDRESS
from ..client import DEFAULT_WAIT_S, EXECUTE_MARGIN_S, ServiceError, ZMQClient
from ..logs import EventLog
from . import observe
from .routes import BYTES_IN, BYTES_OUT, DEFAULT_MAX_BODY_BYTES, ROUTES

log = EventLog("http")

STATUS_CODES = {404: "not_found", 413: "payload_too_large", 401: "unauthorized"}


def error_body(code, message):
    return json.dumps({"error": {"code": code, "message": message}})


class Endpoint:
    """One route; Falcon finds its one responder, so other methods get 405."""

    def __init__(self, method, kind, broker, token, max_body):
        self.kind = kind
        self.broker = broker
        self.token = token
        self.max_body = max_body
        setattr(self, f"on_{method.lower()}", self._get if method == "GET" else self._post)

    def _get(self, req, resp):
        self._serve(req, resp, {})

    def _post(self, req, resp):
        too_large = ServiceError("payload_too_large", f"request body is larger than {self.max_body} bytes")
        if req.content_length is not None and req.content_length > self.max_body:
            raise too_large
        raw = req.bounded_stream.read(self.max_body + 1)
        if len(raw) > self.max_body:
            raise too_large
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ServiceError("invalid_request", f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            raise ServiceError("invalid_request", "request body must be a JSON object")
        self._serve(req, resp, body)

    def _serve(self, req, resp, body):
        if self.token and self.kind != protocol.PING:
            presented = (req.get_header("Authorization") or "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(presented, self.token):
                raise ServiceError("unauthorized", "missing or wrong bearer token")
        use_base64 = body.pop("base64", False) is True
        fields = {k: v for k, v in body.items() if k not in ("v", "type", "id", "token")}
        if self.kind in BYTES_IN and use_base64 and isinstance(fields.get(BYTES_IN[self.kind]), str):
            try:
                fields[BYTES_IN[self.kind]] = base64.b64decode(fields[BYTES_IN[self.kind]], validate=True)
            except binascii.Error:
                raise ServiceError("invalid_request", f"field '{BYTES_IN[self.kind]}' is not valid base64")
        timeout = fields.get("timeout")
        wait_s = DEFAULT_WAIT_S + (timeout + EXECUTE_MARGIN_S if isinstance(timeout, (int, float)) else 0)
        result = self.broker.request(self.kind, wait_s, **fields)
        out = BYTES_OUT.get(self.kind)
        if out in result:
            data = result[out]
            result[out] = base64.b64encode(data).decode() if use_base64 else data.decode("utf-8", errors="replace")
        if self.kind == protocol.PING:
            result["status"] = "ok"
        resp.text = json.dumps(result)


def _service_error(req, resp, exc, params):
    resp.status = falcon.code_to_http_status(protocol.ERROR_CODES.get(exc.code, 500))
    resp.content_type = falcon.MEDIA_JSON
    resp.text = error_body(exc.code, exc.message)


def _http_error(req, resp, exc, params):
    status = falcon.http_status_to_code(exc.status)
    resp.status = exc.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = error_body(STATUS_CODES.get(status, "invalid_request"), exc.title + (f": {exc.description}" if exc.description else ""))


def create_app(context, token=None, max_body=DEFAULT_MAX_BODY_BYTES):
    broker = ZMQClient(INPROC_ADDRESS, token=token or "", context=context)
    app = falcon.App()
    for path, (method, kind) in ROUTES.items():
        app.add_route(path, Endpoint(method, kind, broker, token, max_body))
    observe.add_routes(app, broker, token)
    app.add_error_handler(ServiceError, _service_error)
    app.add_error_handler(falcon.HTTPError, _http_error)
    return app


class HTTPServer:
    """waitress serving the app on its own threads, stoppable from another thread."""

    def __init__(self, app, host, port, threads=64, max_body=DEFAULT_MAX_BODY_BYTES):
        # waitress's own limit is a backstop for chunked bodies; the app answers 413 in JSON first.
        self.server = waitress.create_server(
            app, host=host, port=port, threads=threads, max_request_body_size=2 * max_body,
            channel_timeout=3600, ident="arservice",
        )
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self):
        self.thread.start()
        log.info("http_started", host=self.server.effective_host, port=self.port)

    def stop(self):
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
