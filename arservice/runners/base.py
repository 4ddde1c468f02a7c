"""What every runner shares: agents asked for versus agents registered, and the broker it talks to.

A runner decides where agents come from. It runs on its own thread and sees the broker
only as a client does (over inproc ZMQ), so the broker's state keeps a single owner.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..broker import INPROC_ADDRESS
from ..client import ZMQClient
from ..logs import EventLog

log = EventLog("runner")


class BaseRunner:
    name: str | None = None
    # How long the broker lets a start wait for room; 0: refuse at once (every agent is there already).
    start_wait_s = 0.0
    agents_elsewhere = False  # whether agents may run on other hosts (they then dial this host by name)

    def __init__(self, limits: dict[str, Any], broker_address: str, token: str | None = None,
                 context: zmq.Context | None = None) -> None:
        # `limits` (--max-resources) is part of every runner's constructor: each sizes its agents or
        # jobs by it in its own way, and the broker, not the runner, enforces it.
        self.broker_address = broker_address  # what agents dial
        self.token = token
        self.broker = ZMQClient(INPROC_ADDRESS, token=token or "", context=context)
        self.stopping = threading.Event()
        self.abort = threading.Event()  # a second Ctrl-C: stop waiting on anything and exit
        self.requested = 0  # agents asked for and not yet known to be gone
        self.progress: Callable[[str], None] = lambda line: log.info("progress", status=line)  # the CLI shows it instead

    def registered(self) -> int:
        return len(self.broker.available_resources()["agents"])

    def wait_ready(self, timeout_s: float, abort: threading.Event) -> bool:
        """Block until every agent asked for has registered or `abort` is set; show progress; False if not ready."""
        deadline = time.monotonic() + timeout_s
        shown = None
        while time.monotonic() < deadline and not abort.is_set():
            count = self.registered()
            if count != shown:
                self.progress(f"agents registered: {count}/{self.requested}")
                shown = count
            if count >= self.requested:
                return True
            abort.wait(0.1)
        return False

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str] | None:
        """End every agent; return the ids of whatever could not be confirmed ended (empty when all is clean)."""
        raise NotImplementedError
