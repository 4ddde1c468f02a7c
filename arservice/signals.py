"""Stopping on SIGTERM and SIGINT, in processes with many threads.

CPython runs a Python signal handler in the main thread, but only when that thread runs again.
The kernel may deliver a signal meant for the process to any of its threads that does not block
it (waitress's, the broker's, the runner's), and then nothing wakes a main thread blocked in an
untimed wait: the handler never ran, and a service sent SIGTERM did not stop in 40 s (seen in a
test under load). So the main thread waits in short steps.
"""

import signal
import threading
from collections.abc import Callable

WAKE_S = 0.5  # how late a signal caught by another thread may be handled


def on_signals(handler: Callable[[], None]) -> None:
    """Call handler() (from the main thread) on SIGTERM and SIGINT."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: handler())


def wait_until(event: threading.Event) -> None:
    """In the main thread: wait until `event` is set, running signal handlers meanwhile."""
    while not event.wait(WAKE_S):
        pass
