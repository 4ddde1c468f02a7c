"""Host directories an instance writes into, each a tmpfs of a bounded size.

The exec helper's directory holds every command's whole output until the command ends, and
bubblewrap's /work is a host directory: unbounded, an instance fills the host's disk through
them (1.9 GB from one `head -c 2000000000 /dev/zero`). Each is a tmpfs of its own, mounted
nodev and nosuid (a device node or a setuid file made inside means nothing on the host). A full
one answers ENOSPC to the instance's writes; the host's disk is never touched.

tmpfs pages are memory, charged to the memory cgroup of the process that writes them: in an
instance with a `memory` limit they count against it, so the helper's directory gets at most
half of that limit (at the limit the instance would be OOM-killed instead of told ENOSPC).

Mounting needs CAP_SYS_ADMIN (an agent running as root). Without it the directory is a plain
one, as before (unbounded), unless the bound was asked for (`disk`): then the start is refused.
"""

import ctypes
import os
import shutil
import tempfile

from ..logs import EventLog
from ..protocol import ProtocolError

log = EventLog("hostdir")

HELPER_DIR_MIB = 1024  # the helper's directory, where no `disk` says otherwise
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_warned = []


def helper_dir_mib(config: dict) -> int:
    """The size of an instance's helper directory: `disk` or the default, at most half its memory."""
    size = config.get("disk") or HELPER_DIR_MIB
    return min(size, max(1, config["memory"] // 2)) if config.get("memory") else size


def make(parent: str, prefix: str, size_mib: int, required: bool = False) -> str:
    """A new directory under parent, a tmpfs of size_mib where this agent may mount one.
    `required`: refuse (invalid_request) rather than fall back to an unbounded directory."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    options = f"size={size_mib}m,mode=0700".encode()
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0:
        return path
    reason = os.strerror(ctypes.get_errno())
    if required:
        os.rmdir(path)
        raise ProtocolError("invalid_request", f"this agent cannot enforce disk: mounting a tmpfs failed ({reason}; "
                                               "it needs an agent running as root)")
    if not _warned:
        _warned.append(reason)
        log.warning("host_dir_unbounded", reason=reason, detail="instances' host directories are plain directories")
    return path


def remove(path: str) -> None:
    """Unmount (where mounted) and remove a directory from make()."""
    _libc.umount2(path.encode(), MNT_DETACH)  # EINVAL where it is a plain directory: nothing to do
    shutil.rmtree(path, ignore_errors=True)


def unmount_under(root: str) -> None:
    """Detach every mount below root: what an agent that died left mounted in its directories."""
    prefix = root.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        _libc.umount2(point.encode(), MNT_DETACH)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field
