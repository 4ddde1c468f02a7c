"""Host directories an instance writes into, each a tmpfs of a bounded size.

The exec helper's directory holds every command's whole output until the command ends, and
bubblewrap's /work is a host directory: unbounded, an instance fills the host's disk through
them (1.9 GB from one `head -c 2000000000 /dev/zero`). Each is a tmpfs of its own, mounted
nodev and nosuid (a device node or a setuid file made inside means nothing on the host). A full
one answers ENOSPC to the instance's writes; the host's disk is never touched.

tmpfs pages are memory, charged to the memory cgroup of the process that writes them: in an
instance with a `memory` limit they count against it, so the helper's directory gets at most
half of that limit (at the limit the instance would be OOM-killed instead of told ENOSPC).

A tmpfs also holds one inode per file whatever its size: without nr_inodes an empty file costs
no block, and a 16 MiB tmpfs took 400,000 of them (500 MB of unreclaimable kernel memory). So
each gets one inode per 4 KiB of its size.

A directory that is not bounded (bubblewrap's /work without `disk`) is a bind of itself mounted
nosuid and nodev: on the host's disk, yet a setuid program left in it is not setuid on the host.

Mounting needs CAP_SYS_ADMIN (an agent running as root). Without it the directory is a plain
one, as before (unbounded), unless the bound was asked for (`disk`): then the start is refused.

Directories are removed by `rm -rf --one-file-system`, not shutil.rmtree: rmtree recurses in
Python (3.11), and an instance's tree 3,000 deep raised RecursionError, which ignore_errors does
not catch (the close failed and the directory leaked).
"""

import ctypes
import os
import subprocess
import tempfile

from ..logs import EventLog
from ..protocol import ServiceError

log = EventLog("hostdir")

HELPER_DIR_MIB = 1024  # the helper's directory, where no `disk` says otherwise
MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 2, 4, 32, 4096
INODE_BYTES = 4096  # one inode (file) per this much of a tmpfs's size
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_warned: list[str] = []


def helper_dir_mib(config: dict) -> int:
    """The size of an instance's helper directory: `disk` or the default, at most half its memory."""
    size = config.get("disk") or HELPER_DIR_MIB
    return min(size, max(1, config["memory"] // 2)) if config.get("memory") else size


def make(parent: str, prefix: str, size_mib: int | None, required: bool = False, owner: int | None = None) -> str:
    """A new directory under parent: a tmpfs of size_mib (a nosuid bind of itself when None)
    where this agent may mount one. `required`: refuse (invalid_request) rather than fall back to
    an unbounded directory. `owner`: the uid (and gid) the directory belongs to, else the agent's."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    if size_mib is None:
        mounted = (_libc.mount(path.encode(), path.encode(), None, MS_BIND, None) == 0 and
                   _libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None) == 0)
    else:
        inodes = max(64, (size_mib << 20) // INODE_BYTES)
        ids = f",uid={owner},gid={owner}" if owner is not None else ""
        options = f"size={size_mib}m,nr_inodes={inodes},mode=0700{ids}".encode()
        mounted = _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0
    if owner is not None:
        os.chown(path, owner, owner)
    if mounted:
        return path
    reason = os.strerror(ctypes.get_errno())
    if required:
        remove(path)
        raise ServiceError("invalid_request", f"this agent cannot enforce disk: mounting a tmpfs failed ({reason}; "
                                               "it needs an agent running as root)")
    if not _warned:
        _warned.append(reason)
        log.warning("host_dir_unbounded", reason=reason, detail="instances' host directories are plain directories")
    return path


def remove(path: str) -> None:
    """Unmount (where mounted) and remove a directory from make()."""
    _libc.umount2(path.encode(), MNT_DETACH)  # EINVAL where it is a plain directory: nothing to do
    remove_tree(path)


def remove_tree(path: str) -> None:
    """Remove a directory and everything in it, however deep, never crossing into a mount below
    it (unmount_under first where there may be some). Never raises: what cannot go is left."""
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except OSError as exc:
        log.warning("remove_failed", path=path, reason=str(exc))


def copy_tree(source: str, target: str, timeout_s: float) -> None:
    """Copy what is in `source` into `target` (a fork's files). `cp -a` never follows a link (it
    copies it), makes FIFOs and device nodes anew instead of reading them, keeps owners, modes and
    holes; --reflink=auto shares blocks where the filesystem can (btrfs, xfs), else it copies."""
    try:
        done = subprocess.run(["cp", "-a", "--reflink=auto", "--", os.path.join(source, "."), target],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ServiceError("timeout", f"copying the instance's files took longer than {timeout_s:g}s") from None
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip().splitlines()
        raise ServiceError("environment_error", f"copying the instance's files failed: {error[-1] if error else done.returncode}")


def mounts_under(root: str) -> list[str]:
    """The mount points below root, deepest first."""
    prefix = root.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def unmount_under(root: str) -> None:
    """Detach every mount below root: what an agent that died left mounted in its directories."""
    for point in mounts_under(root):
        _libc.umount2(point.encode(), MNT_DETACH)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field
