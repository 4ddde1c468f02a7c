"""Per-agent working directories under one root, and reaping those of agents that died.

Each agent owns ROOT/<agent id>/, marked with an `owner` file holding "<hostname> <pid>".
A directory whose owner ran on this host and is no longer alive is a crash leftover.

The owner file goes last, once nothing is mounted below the directory: `rm --one-file-system`
skips an instance's tmpfs still mounted there (a close that timed out while dockerd was wedged,
a start that mounted one as the agent stopped), and a directory that kept such a mount but lost
its owner file was never found again. One that lost it all the same (an older agent's) is still
known by its name, "<hostname>-<pid>-<4 hex digits>", when that pid is dead.
"""

import contextlib
import os
import re
import socket

from ..environments import hostdir
from ..logs import EventLog

log = EventLog("workdirs")

# One root per user: another user's agents could neither write into root's, nor root's trust theirs.
DEFAULT_ROOT = "/tmp/arservice" if os.getuid() == 0 else f"/tmp/arservice-{os.getuid()}"
OWNER_FILE = "owner"
# An agent id as agent.Agent makes it ("<hostname>-<pid>-<4 hex digits>"), the name of its directory.
AGENT_ID = re.compile(r"(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{4}")


def claim(root: str, agent_id: str) -> str:
    """Reap leftovers under root, then create and mark this agent's directory."""
    os.makedirs(root, exist_ok=True)
    reap(root)
    path = os.path.join(root, agent_id)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def reap(root: str) -> list[str]:
    """Remove the directories of dead agents of this host; return their paths."""
    host = socket.gethostname()
    reaped = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        owner = _owner(path)
        if owner is not None and owner[0] == host and not alive(owner[1]):
            release(path)
            reaped.append(path)
    return reaped


def release(path: str) -> None:
    """Remove an agent's directory: unmount what is mounted below it (lazily where busy), remove
    the rest, and the owner file last. Where a mount is left all the same, the owner file stays,
    for the reap of a later agent."""
    owner_file = os.path.join(path, OWNER_FILE)
    for _ in range(3):  # a start still running on an abandoned thread may mount one meanwhile
        hostdir.unmount_under(path)  # MNT_DETACH: a mount still in use goes from the tree at once
        try:
            names = os.listdir(path)
        except OSError:
            return
        for name in names:
            if name != OWNER_FILE:
                hostdir.remove_tree(os.path.join(path, name))  # however deep: rmtree raised RecursionError
        if not hostdir.mounts_under(path):
            break
    else:
        log.warning("workdir_kept", path=path, mounts=len(hostdir.mounts_under(path)))
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(owner_file)
    try:
        os.rmdir(path)
    except OSError as exc:  # what cannot go is left, as remove_tree leaves it
        log.warning("workdir_left", path=path, reason=exc.strerror)


def _owner(path: str) -> tuple[str, int] | None:
    """(host, pid) of the agent that owns the directory: from its owner file, or from its name
    where the file is gone."""
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return None
    return agent_owner(os.path.basename(path)) if os.path.isdir(path) else None


def agent_owner(agent_id: str) -> tuple[str, int] | None:
    """(host, pid) an agent id as agent.Agent makes it names; None for another name."""
    named = AGENT_ID.fullmatch(agent_id)
    return (named["host"], int(named["pid"])) if named else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
