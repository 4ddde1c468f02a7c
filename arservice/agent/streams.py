"""Streamed output: what a command has written since the last look, for its chunk messages.

A command through the exec helper (and a session's) writes to a file in the helper's directory:
its tail is read from there, never past what the command wrote by its deadline (`cut`), so the
chunks add up to what the final answer's output is cut from. A host process's output comes
through a pipe the command object reads: a tee keeps what came since the last look.
"""

import os
from collections.abc import Iterator
from typing import Any

from ..environments import safefs
from ..protocol import ServiceError

CHUNK_BYTES = 1 << 20  # the most one chunk message carries
PUMP_BYTES = 4 << 20  # the most one stream sends per turn of the loop, so others get their turn too


class FileTail:
    """New bytes of the output file at `path`, up to the command's `cut` once it has one."""

    def __init__(self, command: Any, path: str) -> None:
        self.command = command
        self.path = path
        self.fd: int | None = None
        self.offset = 0

    def take(self, limit: int = PUMP_BYTES) -> bytes:
        if self.fd is None:
            try:
                self.fd = safefs.open_file(self.path, os.O_RDONLY, shown="the command's output")
            except ServiceError:  # not there yet (or not a regular file: never read)
                return b""
        cut = getattr(self.command, "cut", None)
        if cut is not None:
            limit = min(limit, max(0, cut - self.offset))
        data = os.pread(self.fd, limit, self.offset) if limit else b""
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class PipeTee:
    """Stands in for a host command's BoundedOutput: feeds it, and keeps a copy until taken."""

    def __init__(self, command: Any) -> None:
        self.inner = command.output
        self.pending = bytearray()
        command.output = self

    def feed(self, chunk: bytes) -> None:
        self.inner.feed(chunk)
        self.pending += chunk

    def value(self) -> Any:
        return self.inner.value()

    def take(self, limit: int = PUMP_BYTES) -> bytes:
        data = bytes(self.pending[:limit])
        del self.pending[:limit]
        return data

    def close(self) -> None:
        self.pending.clear()


def tail_of(command: Any) -> "FileTail | PipeTee | None":
    """The stream of a running command (environments.process.Watched), or None if its output
    cannot be followed (then only its answer comes)."""
    if hasattr(command, "output") and hasattr(command.output, "feed"):
        return PipeTee(command)
    session = getattr(command, "session", None)
    if session is not None:
        return FileTail(command, session.base + ".out")
    base = getattr(command, "base", None)
    if base is not None:
        return FileTail(command, base + ".out")
    return None


def chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start:start + CHUNK_BYTES]
