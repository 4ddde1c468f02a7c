"""The HTTP API's routes and how each maps to a protocol message; shared by server and HTTP client."""

from .. import protocol

ROUTES = {
    "/start_instance": ("POST", protocol.START_INSTANCE),
    "/execute_command": ("POST", protocol.EXECUTE),
    "/close_instance": ("POST", protocol.CLOSE_INSTANCE),
    "/renew_instance": ("POST", protocol.RENEW),
    "/fork_instance": ("POST", protocol.FORK_INSTANCE),
    "/snapshot_instance": ("POST", protocol.SNAPSHOT_INSTANCE),
    "/delete_snapshot": ("POST", protocol.DELETE_SNAPSHOT),
    "/write_file": ("POST", protocol.WRITE_FILE),
    "/read_file": ("POST", protocol.READ_FILE),
    "/create_session": ("POST", protocol.CREATE_SESSION),
    "/run_in_session": ("POST", protocol.RUN_IN_SESSION),
    "/close_session": ("POST", protocol.CLOSE_SESSION),
    "/get_available_resources": ("GET", protocol.RESOURCES),
    "/instances": ("GET", protocol.INSTANCES),
    "/status": ("GET", protocol.STATUS),
    "/health": ("GET", protocol.PING),
}
PATHS = {kind: path for path, (_, kind) in ROUTES.items()}

# Byte fields travel as text in JSON; a request with "base64": true carries them base64-encoded instead.
BYTES_IN = {protocol.WRITE_FILE: "content"}
BYTES_OUT = {protocol.EXECUTE: "output", protocol.READ_FILE: "content", protocol.RUN_IN_SESSION: "output"}
# A GET's fields come as query parameters, all text; these are numbers.
QUERY_INTS = {"limit"}

DEFAULT_MAX_BODY_BYTES = 100 << 20
