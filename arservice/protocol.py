"""The arservice wire protocol, shared by broker, agents and clients.

Every message is a msgpack map, sent as one ZeroMQ frame or (to a broker with a token, past
MAX_FRAME_BYTES) as the frames of one multipart message whose bytes, joined, are the map:

    {"v": 1, "type": "<message type>", "id": <request id>, ...fields}

The sender of a request chooses its id; the answer carries the same id and is
either {"type": "reply", "result": {...}} or
{"type": "error", "error": {"code": <one of ERROR_CODES>, "message": "..."}}.

docs/protocol.md describes every message type and its fields.
"""

import hmac
import math
from typing import Any

import msgpack

# A decoded message: a msgpack map with string keys (see the module docstring).
Message = dict[str, Any]

VERSION = 1

# The largest message a peer may send: an HTTP body's worth plus framing.
MAX_MESSAGE_BYTES = 256 << 20
# The largest frame the broker reads from a TCP peer when it has a token (libzmq drops the connection
# of a peer sending a longer one). It bounds what a peer that fails the CURVE handshake can make
# libzmq buffer: the handshake's frames are read under the same limit. Longer messages are split.
MAX_FRAME_BYTES = 1 << 20
# A message whose strings and bytes come to this many is packed in place (see encode()).
PACK_IN_PLACE_BYTES = 256 << 10
# What the envelope of a frame may hold before its sender is known to be allowed to send it.
ENVELOPE_FIELDS = ("v", "type", "id", "token", "secret")
MAX_FIELDS = 64
MAX_ENVELOPE_ITEM = 4096
# Containers in a whole decoded message; nesting is bounded by msgpack's own stack (StackError).
MAX_CONTAINER_LEN = 1 << 20
# The largest integer msgpack carries, and the most seconds any timeout may be.
MAX_INT = (1 << 64) - 1
MAX_SECONDS = 86400.0

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
FORK_INSTANCE = "fork_instance"  # new instances whose files are copies of a running one's
SNAPSHOT_INSTANCE = "snapshot_instance"  # a named copy of a running instance's files, for later starts
DELETE_SNAPSHOT = "delete_snapshot"
RENEW = "renew"      # keep an instance's lease: its idle clock starts again, and optionally a new ttl
METRICS = "metrics"  # the broker's counters and gauges, for GET /metrics
STATUS = "status"    # agents, instances, runner report, recent errors: the status page and `arservice status`
CREATE_SESSION = "create_session"  # a persistent bash in an instance: cwd, variables, functions persist
RUN_IN_SESSION = "run_in_session"
CLOSE_SESSION = "close_session"

# Runner -> broker (runners are clients on the inproc socket).
RUNNER_STATUS = "runner_status"
RELEASE_AGENT = "release_agent"

# Answers.
REPLY = "reply"
ERROR = "error"
# Part of an answer to a request with `stream: true` (execute, run_in_session): output as it comes,
# {"data": bytes}, in order; the reply (or error) follows the last one.
CHUNK = "chunk"
STREAMABLE = (EXECUTE, RUN_IN_SESSION)

# The HTTP API: each route and the message it maps to; shared by the HTTP front end and client.
ROUTES = {
    "/start_instance": ("POST", START_INSTANCE),
    "/execute_command": ("POST", EXECUTE),
    "/close_instance": ("POST", CLOSE_INSTANCE),
    "/renew_instance": ("POST", RENEW),
    "/fork_instance": ("POST", FORK_INSTANCE),
    "/snapshot_instance": ("POST", SNAPSHOT_INSTANCE),
    "/delete_snapshot": ("POST", DELETE_SNAPSHOT),
    "/write_file": ("POST", WRITE_FILE),
    "/read_file": ("POST", READ_FILE),
    "/create_session": ("POST", CREATE_SESSION),
    "/run_in_session": ("POST", RUN_IN_SESSION),
    "/close_session": ("POST", CLOSE_SESSION),
    "/get_available_resources": ("GET", RESOURCES),
    "/instances": ("GET", INSTANCES),
    "/status": ("GET", STATUS),
    "/health": ("GET", PING),
}
PATHS = {kind: path for path, (_, kind) in ROUTES.items()}

# Byte fields travel as text in JSON; a request with "base64": true carries them base64-encoded instead.
BYTES_IN = {WRITE_FILE: "content"}
BYTES_OUT = {EXECUTE: "output", READ_FILE: "content", RUN_IN_SESSION: "output"}
# A GET's fields come as query parameters, all text; these are numbers.
QUERY_INTS = {"limit"}
# The largest HTTP request body the front end reads (--max-request-bytes).
DEFAULT_MAX_BODY_BYTES = 100 << 20

# Stable error codes and the HTTP status each maps to.
ERROR_CODES = {
    "invalid_request": 400,
    "unsupported_version": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "expired": 410,
    "payload_too_large": 413,
    "internal": 500,
    "agent_lost": 502,
    "environment_error": 502,
    "instance_lost": 502,
    "no_capacity": 503,
    "not_registered": 503,
    "unreachable": 503,
    "unavailable": 503,
    "timeout": 504,
}


class ServiceError(Exception):
    """An error answer, with its stable code (ERROR_CODES): raised where the service refuses a
    request, carried back as an error message, and raised again by the clients that receive it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode(msg: Message) -> bytes | memoryview:
    """One frame; invalid_request for what msgpack cannot carry (an int past 64 bits, a lone surrogate).

    A message carrying large strings or bytes is packed into a buffer sized for them up front and
    comes back as a view of that buffer: msgpack's own buffer would grow by doubling, to about
    twice the payload, and then be copied into the bytes returned."""
    try:
        bulk = _bulk(msg)
        if bulk < PACK_IN_PLACE_BYTES:
            frame: bytes = msgpack.packb(msg, use_bin_type=True)
            return frame
        packer = msgpack.Packer(use_bin_type=True, autoreset=False, buf_size=bulk + (64 << 10))  # type: ignore[call-arg]  # the stubs lack buf_size
        packer.pack(msg)
        return packer.getbuffer()
    except (ValueError, OverflowError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise ServiceError("invalid_request", f"the message cannot be encoded: {exc.__class__.__name__}: {exc}") from exc


def _bulk(msg: Message) -> int:
    """The length of the strings and bytes at a message's top level and one map down (an answer's
    result): about what its frame will hold."""
    size = 0
    for value in msg.values():
        if isinstance(value, (bytes, str)):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(item) for item in value.values() if isinstance(item, (bytes, str)))
    return size


def split(data: bytes | memoryview) -> list[bytes | memoryview]:
    """A message's bytes as the frames of one multipart message, none over MAX_FRAME_BYTES."""
    if len(data) <= MAX_FRAME_BYTES:
        return [data]
    view = memoryview(data)
    return [view[start:start + MAX_FRAME_BYTES] for start in range(0, len(data), MAX_FRAME_BYTES)]


def joined(frames: list[bytes]) -> bytes:
    """The message bytes of a multipart message's frames (the inverse of split()); payload_too_large
    past MAX_MESSAGE_BYTES."""
    if len(frames) == 1:
        return frames[0]
    size = sum(len(frame) for frame in frames)
    if size > MAX_MESSAGE_BYTES:
        raise ServiceError("payload_too_large", f"a message of {size} bytes: the most is {MAX_MESSAGE_BYTES}")
    return b"".join(frames)


def unwrap(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(envelope, message frames) of what a ROUTER received: the sender's identity, and the empty
    delimiter a REQ socket puts first, are the envelope (a message's first frame is never empty)."""
    cut = 2 if len(frames) > 2 and not frames[1] else 1
    return frames[:cut], frames[cut:]


def peek(frame: bytes) -> Message:
    """The envelope fields of a frame (ENVELOPE_FIELDS), building nothing else.

    Everything but those few small fields is skipped unparsed, so a peer that is not allowed
    to send costs no more than its frame: a 16 MiB frame of empty maps would otherwise become
    a gigabyte of Python objects before its token is looked at."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(1, len(frame)),
                                max_str_len=MAX_ENVELOPE_ITEM, max_bin_len=MAX_ENVELOPE_ITEM,
                                max_array_len=MAX_FIELDS, max_map_len=MAX_FIELDS, max_ext_len=MAX_ENVELOPE_ITEM)
    unpacker.feed(frame)
    head: Message = {}
    try:
        count = unpacker.read_map_header()
        if count > MAX_FIELDS:
            raise ServiceError("invalid_request", f"malformed frame: more than {MAX_FIELDS} fields")
        for _ in range(count):
            key = unpacker.unpack()
            if isinstance(key, str) and key in ENVELOPE_FIELDS:
                head[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever msgpack raises, the frame is malformed)
        raise ServiceError("invalid_request", f"malformed frame: not a msgpack map ({exc.__class__.__name__})") from exc
    return _checked(head)


def skim(frame: bytes) -> tuple[Message, list[tuple[str, int, int]]]:
    """A message's fields with their large strings and bytes left out, and where each top-level
    field lies in the frame: (name, start, end), for readdressed().

    A reply carrying 64 MiB of output is then read without building it: its small fields (and a
    map's, one level down) are decoded; a str or bin past MAX_ENVELOPE_ITEM, at either level,
    is None. The frame comes from a known peer (an agent), so only msgpack's own checks apply."""
    view = memoryview(frame)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(1, len(frame)))
    unpacker.feed(frame)
    msg: Message = {}
    spans = []
    try:
        for _ in range(unpacker.read_map_header()):
            start = unpacker.tell()
            name = unpacker.unpack()
            msg[name] = _skimmed_value(unpacker, view, 1)
            spans.append((name, start, unpacker.tell()))
    except Exception as exc:  # noqa: BLE001 (whatever msgpack raises, the frame is malformed)
        raise ServiceError("invalid_request", f"malformed frame: not a msgpack map ({exc.__class__.__name__})") from exc
    return _checked(msg), spans


def _skimmed_value(unpacker: msgpack.Unpacker, view: memoryview, depth: int) -> Any:
    """The next value, a str or bin past MAX_ENVELOPE_ITEM skipped (None), maps read down to depth 2."""
    at = unpacker.tell()
    marker = view[at]
    if depth < 2 and (0x80 <= marker <= 0x8F or marker in (0xDE, 0xDF)):  # a map: fix, 16-bit, 32-bit
        return {unpacker.unpack(): _skimmed_value(unpacker, view, depth + 1) for _ in range(unpacker.read_map_header())}
    if 0xC4 <= marker <= 0xC6 or 0xD9 <= marker <= 0xDB:  # bin or str with an 8, 16 or 32-bit length
        width = 1 << (marker - (0xC4 if marker <= 0xC6 else 0xD9))
        if int.from_bytes(view[at + 1:at + 1 + width], "big") > MAX_ENVELOPE_ITEM:
            unpacker.skip()
            return None
    return unpacker.unpack()


def readdressed(frame: bytes, spans: list[tuple[str, int, int]], id_: object) -> bytes:
    """The message of `frame` (laid out as skim() found it) with `id_` as its id: every other
    field's bytes are copied as they are, once, never decoded and encoded again."""
    view = memoryview(frame)
    parts: list[bytes | memoryview] = [msgpack.Packer().pack_map_header(len(spans))]
    for name, start, end in spans:
        parts.append(msgpack.packb("id") + msgpack.packb(id_, use_bin_type=True) if name == "id" else view[start:end])
    return b"".join(parts)


def decode(frame: bytes) -> Message:
    """Parse one frame; raise ServiceError for anything that is not a valid message."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_str_len=MAX_MESSAGE_BYTES,
                              max_bin_len=MAX_MESSAGE_BYTES, max_array_len=MAX_CONTAINER_LEN,
                              max_map_len=MAX_CONTAINER_LEN, max_ext_len=MAX_ENVELOPE_ITEM)
    except Exception as exc:
        raise ServiceError("invalid_request", f"malformed frame: not msgpack ({exc.__class__.__name__})") from exc
    if not isinstance(msg, dict):
        raise ServiceError("invalid_request", "malformed frame: message must be a map")
    return _checked(msg)


def _checked(msg: Message) -> Message:
    if msg.get("v") != VERSION:
        raise ServiceError("unsupported_version", f"protocol version {msg.get('v')!r} is not supported, use {VERSION}")
    if not isinstance(msg.get("type"), str):
        raise ServiceError("invalid_request", "field 'type' must be a string")
    return msg


def same_secret(presented: object, expected: str) -> bool:
    """Constant-time comparison of a presented token or secret (any type, any characters) with ours."""
    if not isinstance(presented, str):
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def request(type_: str, id_: object, **fields: Any) -> Message:
    return {"v": VERSION, "type": type_, "id": id_, **fields}


def reply(id_: object, result: Any) -> Message:
    return {"v": VERSION, "type": REPLY, "id": id_, "result": result}


def error(id_: object, code: str, message: str) -> Message:
    return {"v": VERSION, "type": ERROR, "id": id_, "error": {"code": code, "message": message}}


def check_value(value: Any, name: str, what: str = "field") -> Any:
    """Every string (key or value, at any depth) without NUL, every number finite: what may reach an
    argv, a path, an environment, or a JSON answer."""
    if isinstance(value, str) and "\0" in value:
        raise ServiceError("invalid_request", f"{what} '{name}' must not contain a NUL byte")
    if isinstance(value, float) and not math.isfinite(value):
        raise ServiceError("invalid_request", f"{what} '{name}' must be a finite number, not {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_value(key, name, what)
            check_value(item, name, what)
    elif isinstance(value, list):
        for item in value:
            check_value(item, name, what)
    return value


def environment_map(value: Any, name: str) -> dict[str, str]:
    """Check {name: value} environment variables as exec needs them; return the map."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ServiceError("invalid_request", f"field '{name}' must map strings to strings")
    for key, item in value.items():
        if not key or "=" in key or "\0" in key:
            raise ServiceError("invalid_request", f"field '{name}' has an invalid variable name {key!r}: "
                                                   "names are non-empty, without '=' or NUL")
        if "\0" in item:
            raise ServiceError("invalid_request", f"field '{name}': variable {key!r} must not contain a NUL byte")
    return value
