"""The arservice wire protocol, shared by broker, agents and clients.

Every message is one ZeroMQ frame holding a msgpack map:

    {"v": 1, "type": "<message type>", "id": <request id>, ...fields}

The sender of a request chooses its id; the answer carries the same id and is
either {"type": "reply", "result": {...}} or
{"type": "error", "error": {"code": <one of ERROR_CODES>, "message": "..."}}.

docs/protocol.md describes every message type and its fields.
"""

import msgpack

VERSION = 1

# Agent <-> broker.
REGISTER = "register"
HEARTBEAT = "heartbeat"
DISCONNECT = "disconnect"

# Client -> broker, and (the instance ones) broker -> agent.
START_INSTANCE = "start_instance"
EXECUTE = "execute"
CLOSE_INSTANCE = "close_instance"
WRITE_FILE = "write_file"
READ_FILE = "read_file"
RESOURCES = "resources"
INSTANCES = "instances"
PING = "ping"
METRICS = "metrics"  # the broker's counters and gauges, for GET /metrics
STATUS = "status"    # agents, instances, runner report, recent errors: the status page and `arservice status`

# Runner -> broker (runners are clients on the inproc socket).
RUNNER_STATUS = "runner_status"
RELEASE_AGENT = "release_agent"

# Answers.
REPLY = "reply"
ERROR = "error"

# Stable error codes and the HTTP status each maps to.
ERROR_CODES = {
    "invalid_request": 400,
    "unsupported_version": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "internal": 500,
    "agent_lost": 502,
    "environment_error": 502,
    "no_capacity": 503,
    "not_registered": 503,
    "timeout": 504,
}


class ProtocolError(Exception):
    """An error that travels back to the requester as an error message."""

    def __init__(self, code, message):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


def encode(msg):
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame):
    """Parse one frame; raise ProtocolError for anything that is not a valid message."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError("invalid_request", f"malformed frame: not msgpack ({exc.__class__.__name__})")
    if not isinstance(msg, dict):
        raise ProtocolError("invalid_request", "malformed frame: message must be a map")
    if msg.get("v") != VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {msg.get('v')!r} is not supported, use {VERSION}")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("invalid_request", "field 'type' must be a string")
    return msg


def request(type_, id_, **fields):
    return {"v": VERSION, "type": type_, "id": id_, **fields}


def reply(id_, result):
    return {"v": VERSION, "type": REPLY, "id": id_, "result": result}


def error(id_, code, message):
    return {"v": VERSION, "type": ERROR, "id": id_, "error": {"code": code, "message": message}}


def field(msg, name, kind, default=..., check=None, what=None):
    """Read msg[name], requiring it to be of `kind`; raise invalid_request naming the field otherwise.

    `default` makes the field optional (None counts as absent); `check` is a predicate
    the value must pass, described by `what` in the error.
    """
    value = msg.get(name)
    if value is None:
        if default is ...:
            raise ProtocolError("invalid_request", f"missing required field '{name}'")
        return default
    if kind is float:
        kind = (int, float)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError("invalid_request", f"field '{name}' has the wrong type: {type(value).__name__}")
    if check is not None and not check(value):
        raise ProtocolError("invalid_request", f"field '{name}' must be {what}")
    return value


def string_map(msg, name):
    """An optional {str: str} field, such as environment variables."""
    value = field(msg, name, dict, default={})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ProtocolError("invalid_request", f"field '{name}' must map strings to strings")
    return value
