"""ZeroMQ's CURVE security on the broker's TCP socket, keyed by the service's token.

With a token, a peer must complete a CURVE handshake with a key derived from that token before
libzmq hands the broker (or buffers for it) a single frame of its messages; a peer without it costs
the broker a refused handshake. Nothing new is distributed: every key is derived from the token
(SHA-256 of a label and the token is a Curve25519 secret key), so whoever holds the token, and
only they, can compute both the broker's public key (to reach it) and the one client key the
broker accepts. The broker checks that key in a ZAP handler it polls on its own loop (no thread).

Messages still carry the token (and agents their secret): the broker's per-message checks stay as
they were, for inproc peers, which have no handshake, and to tell agents from clients.
See docs/protocol.md ("Authentication").
"""

import hashlib
import time

import zmq
from zmq.utils import z85

from .logs import EventLog

log = EventLog("broker")

# libzmq asks the handler bound here (in the socket's context) about every CURVE handshake.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
KEY_LABEL = b"arservice curve v1 "
# What CURVE adds to each frame on the wire (its MESSAGE command: name, flags, nonce, MAC; 33 bytes),
# which libzmq counts against ZMQ_MAXMSGSIZE; rounded up.
FRAME_OVERHEAD_BYTES = 64
# A peer retrying a wrong key every 100 ms is logged at most this often.
LOG_EVERY_S = 10.0


def keypair(token: str, role: str) -> tuple[bytes, bytes]:
    """(public, secret) Curve25519 keys, Z85-encoded, of `role` ("broker" or "client") for this token."""
    seed = hashlib.sha256(KEY_LABEL + role.encode() + b"\0" + token.encode("utf-8", "surrogatepass")).digest()
    secret = z85.encode(seed)
    return zmq.curve_public(secret), secret


def secure_server(sock: zmq.Socket, token: str) -> None:
    """Make `sock` (before it binds) a CURVE server with the broker's key for this token."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair(token, "broker")[1])


def secure_client(sock: zmq.Socket, token: str) -> None:
    """Make `sock` (before it connects) a CURVE client holding this token's client key."""
    public, secret = keypair(token, "client")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keypair(token, "broker")[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


class Handshakes:
    """Follows a connecting socket's monitor events (EVENTS) and says when the broker refuses it.

    A broker with a token whose ZAP handler refuses a key answers with an error (HANDSHAKE_FAILED_AUTH).
    A peer whose mechanism is not the broker's (a token, or none, where the broker has none, or one)
    fails on the mechanism (HANDSHAKE_FAILED_PROTOCOL), unless the broker noticed first and closed
    the connection. A wrong token yields a wrong broker key, whose handshake the broker cannot even
    read: it closes the connection too. A closed connection (HANDSHAKE_FAILED_NO_DETAIL) is also
    what a broker dying mid-handshake causes, so only several in a row, with no success between, count."""

    EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    CLOSED_IN_A_ROW = 3

    def __init__(self, with_token: bool) -> None:
        self.with_token = with_token
        self.closed = 0

    def refusal(self, event: int, value: int) -> str | None:
        """What the event says, if it says that this peer is refused; None otherwise."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.closed = 0
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return "the broker refused this token's key: wrong token"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                return self._mismatch()
            return f"the broker refused the handshake (ZMTP protocol error {value:#x}): a wrong token?"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.closed += 1
            if self.closed >= self.CLOSED_IN_A_ROW:
                why = "wrong token, or " + self._mismatch() if self.with_token else self._mismatch()
                return f"the broker closed the connection during the handshake {self.closed} times in a row: {why}"
        return None

    def _mismatch(self) -> str:
        if self.with_token:
            return "this peer has a token, but the broker takes none (it runs without --token)"
        return "the broker requires a token (it runs with --token): set ARSERVICE_TOKEN or token="


class ZapHandler:
    """The ZAP (ZeroMQ authentication protocol) server for one context, answered from the broker's loop.

    It accepts a CURVE handshake only from the client key of the token; everything else gets 400."""

    def __init__(self, ctx: zmq.Context, token: str) -> None:
        self.client_key = z85.decode(keypair(token, "client")[0])
        self.refused = 0
        self._logged_at = -LOG_EVERY_S
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            self.sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self.sock.close()
            raise

    def answer(self) -> None:
        """Answer every ZAP request waiting, without blocking."""
        while True:
            try:
                request = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # version, request id, domain, address, routing id, mechanism, credentials...
            ok = len(request) == 7 and request[0] == ZAP_VERSION and request[5] == b"CURVE" \
                and request[6] == self.client_key
            request_id = request[1] if len(request) > 1 else b""
            if not ok:
                self._refuse(request)
            self.sock.send_multipart([ZAP_VERSION, request_id, b"200" if ok else b"400",
                                      b"OK" if ok else b"wrong token", b"", b""])

    def _refuse(self, request: list) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            address = request[3].decode(errors="replace") if len(request) > 3 else "?"
            log.warning("handshake_refused", address=address, reason="wrong token", refused_so_far=self.refused)

    def close(self) -> None:
        self.sock.close()
