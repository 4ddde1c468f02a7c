"""Per-agent working directories under one root, and reaping those of agents that died.

Each agent owns ROOT/<agent id>/, marked with an `owner` file holding "<hostname> <pid>".
A directory whose owner ran on this host and is no longer alive is a crash leftover.
"""

import os
import socket

from ..environments import hostdir

# One root per user: another user's agents could neither write into root's, nor root's trust theirs.
DEFAULT_ROOT = "/tmp/arservice" if os.getuid() == 0 else f"/tmp/arservice-{os.getuid()}"
OWNER_FILE = "owner"


def claim(root, agent_id):
    """Reap leftovers under root, then create and mark this agent's directory."""
    os.makedirs(root, exist_ok=True)
    reap(root)
    path = os.path.join(root, agent_id)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def reap(root):
    """Remove the directories of dead agents of this host; return their paths."""
    host = socket.gethostname()
    reaped = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner_host, pid = f.read().split()
        except (OSError, ValueError):
            continue
        if owner_host == host and not alive(int(pid)):
            hostdir.unmount_under(path)  # its instances' tmpfs directories
            hostdir.remove_tree(path)  # however deep: shutil.rmtree raised RecursionError
            reaped.append(path)
    return reaped


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
