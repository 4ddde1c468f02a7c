"""Opening files the agent shares with an instance, as the instance cannot turn against the host.

An instance writes to directories the agent also reads and writes on the host (bubblewrap's
/work, the exec helper's directory). Anything there may be hostile: a symlink would lead the
agent to the host's own files, and a directory checked first and opened after can be swapped
for a symlink in between (renameat2 RENAME_EXCHANGE wins that race hundreds of times in a
thousand). So paths under such a directory are walked one name at a time from a descriptor of
the directory, each name opened relative to the last with O_NOFOLLOW: what was checked is what
is used, and nothing resolves outside. (openat2's RESOLVE_BENEATH does the same in one call, on
Linux 5.6 and later only; the walk costs a few microseconds per name and works everywhere.)

A FIFO opened for reading waits for a writer, forever if the instance wants: every file is
opened non-blocking and refused unless fstat says it is a regular file (a FIFO where one is
expected).
"""

import errno
import os
import stat
from collections.abc import Callable

from ..protocol import ServiceError

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(root: str, path: str, flags: int, mode: int = 0o644, make_parents: bool = False,
                 shown: str | None = None, owner: int | None = None) -> int:
    """A descriptor of the regular file at `path` (relative) under the directory `root`, reached
    without following any symlink; directories on the way are made when `make_parents`.
    `shown` is how errors name the file (the instance's own path, never the host's). `owner`:
    the uid (and gid) that directories made on the way and a file created belong to (the
    sandbox's, so that inside it they are its root's, as what it makes itself)."""
    shown = shown or path
    names = [name for name in path.split("/") if name not in ("", ".")]
    if ".." in names:
        raise ServiceError("invalid_request", f"{shown}: '..' is not allowed here")
    if not names:
        raise ServiceError("invalid_request", f"{shown} is a directory")
    directory = os.open(root, DIRECTORY)
    try:
        for name in names[:-1]:
            parent, directory = directory, _open_directory(directory, name, make_parents, shown, owner)
            os.close(parent)
        fd = open_file(names[-1], flags, mode, dir_fd=directory, shown=shown)
        if owner is not None and flags & os.O_CREAT:
            os.fchown(fd, owner, owner)
        return fd
    finally:
        os.close(directory)


def open_file(path: str, flags: int, mode: int = 0o644, dir_fd: int | None = None, follow: bool = False,
              kind: Callable[[int], bool] = stat.S_ISREG, shown: str | None = None) -> int:
    """Open without waiting (O_NONBLOCK) and, unless `follow`, without following a final symlink;
    refuse anything that is not of `kind` (stat.S_ISREG, a regular file, by default)."""
    shown = shown or path
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(exc, shown) from None
    if not kind(os.fstat(fd).st_mode):
        os.close(fd)
        raise ServiceError("invalid_request", f"{shown} is not a {'regular file' if kind is stat.S_ISREG else 'FIFO'}")
    return fd


def read_limited(fd: int, limit: int, shown: str) -> bytes:
    """All of an open file, closing it; payload_too_large past `limit` bytes."""
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ServiceError("payload_too_large", f"{shown} is larger than the read limit of {limit} bytes")
    return data


def write_all(fd: int, content: bytes, mode: int) -> None:
    """Write content to an open file and set its permission bits, closing it."""
    with open(fd, "wb") as f:
        f.write(content)
        os.fchmod(f.fileno(), mode)


def _open_directory(parent: int, name: str, make: bool, shown: str, owner: int | None) -> int:
    try:
        return os.open(name, DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not make:
            raise ServiceError("not_found", f"no such file: {shown}") from None
    try:
        os.mkdir(name, 0o755, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile, by the instance or another request: opened as any other below
    try:
        directory = os.open(name, DIRECTORY, dir_fd=parent)
    except OSError as exc:
        raise _refusal(exc, shown) from None
    if owner is not None:
        os.fchown(directory, owner, owner)  # the descriptor: what was opened, whatever is at the name now
    return directory


def _refusal(exc: OSError, shown: str) -> Exception:
    """The client's error for a failed open, naming the instance's path."""
    if exc.errno == errno.ENOENT:
        return ServiceError("not_found", f"no such file: {shown}")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ServiceError("invalid_request", f"{shown} goes through a symlink or a non-directory: "
                                                "files are exchanged as regular files under real directories only")
    if exc.errno == errno.EISDIR:
        return ServiceError("invalid_request", f"{shown} is a directory")
    if exc.errno == errno.ENXIO:  # a FIFO without a reader opened to write, a socket
        return ServiceError("invalid_request", f"{shown} is not a regular file")
    return exc
