"""Experimental: a bubblewrap sandbox per instance over a per-instance work directory.

Either the host's /usr, /etc and friends bound read-only, or a rootfs directory (`root`) as `/`.
The instance's writable directory is /work; everything else is read-only or a tmpfs. Namespaces
are all unshared (no network unless `network: true`), the sandbox dies with the agent, and it
gets a new session so it cannot push input into the agent's terminal.

With fast_exec (the default) one sandbox lives as long as the instance and runs the exec
helper, so a command costs a fork instead of a sandbox set-up, and /tmp lasts as long as the
instance, as in a container. Without it every command gets a fresh sandbox.

The sandbox holds no privilege on the host. bwrap run by a root agent would map the sandbox's
root to the host's root, with every capability: it could remount the host's read-only binds
writable, read /etc/shadow, leave a setuid-root program in /work and lift its disk bound. So a
root agent runs bwrap as SANDBOX_UID, an unprivileged host uid that owns nothing, in a user
namespace of its own whose uid 0 maps to it (`id` inside still says root, and what the sandbox
makes is root's inside), with every capability dropped. The host side of /work, /tmp (with
`disk`) and the helper's directory belong to that uid and are mounted nosuid,nodev; files the
agent puts there (write_file, the helper's FIFOs) are made that uid's too.
"""

import os
import shutil
import stat
from typing import Any

from pydantic import Field

from ...protocol import ServiceError
from ...schemas import Text
from .. import hostdir, process, safefs
from ..base import Shell, Spec, Words, check_command, resolve_path, shell_argv
from ..helper import MOUNT, ExecHelper, HelperEnvironment, helper_argv
from ..process import AGENT_MARK, Watched

WORK = "/work"
HOST_DIRS = ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64")
# Made fresh in every sandbox, so never taken from the host or the rootfs.
OWN_DIRS = ("proc", "dev", "tmp", WORK.strip("/"), MOUNT.strip("/"))
# The host uid (and gid) a root agent's sandboxes run as: in no passwd file, owning nothing
# (65534 is nobody; 65000-65533 are left unallocated by Debian's policy).
SANDBOX_UID = int(os.environ.get("ARSERVICE_SANDBOX_UID", "65533"))


def read_only_binds(root: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """bwrap arguments that show root/NAME read-only at /NAME (symlinks stay symlinks)."""
    args = []
    for name in names:
        path = os.path.join(root, name)
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), "/" + name]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, "/" + name]
    return args


BIND_OPTIONS = {"--bind", "--bind-try", "--ro-bind", "--ro-bind-try", "--dev-bind", "--dev-bind-try"}


def unreachable(path: str) -> str | None:
    """The first directory on the way to `path` that SANDBOX_UID (no groups, owning nothing)
    may not search, or None: bwrap, run as that uid, must reach every path it binds."""
    path = os.path.abspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    while True:
        try:
            status = os.stat(directory)
        except OSError:
            return None  # missing: bwrap's own error (or a -try option) says so
        if not status.st_mode & stat.S_IXOTH and status.st_uid != SANDBOX_UID:
            return directory
        if directory == "/":
            return None
        directory = os.path.dirname(directory)


class BubblewrapSpec(Spec):
    root: Text | None = Field(None, description="A root filesystem directory (default: the host's, read-only).")
    shell: Shell | None = Field(None, description="Default: bash where the sandbox has it, else sh.")
    fast_exec: bool = Field(True, description="Commands through the exec helper; false: a sandbox each.")
    bwrap_options: Words = Field(default_factory=list, description="More bwrap arguments.")
    revive: bool = Field(False, description="A sandbox killed from outside: a new one over the same /work (true), "
                                            "or the instance is lost.")


class BubblewrapEnvironment(HelperEnvironment):
    type = "bubblewrap"
    can_fork = True
    enforces = {"network", "disk"}
    spec_model = BubblewrapSpec
    workdir: str = None  # type: ignore[assignment]  # made by start(), before any use but close()'s
    tmp_dir: str | None = None
    host_dir: str | None = None
    owner: int | None = None
    groups: set[int] = ()  # type: ignore[assignment]  # a set from start() on; empty for a close() before it

    @classmethod
    def parse_config(cls, spec: dict[str, Any]) -> dict[str, Any]:
        config = super().parse_config(spec)
        if isinstance(config["network"], str):
            raise ServiceError("invalid_request", "bubblewrap environments cannot join a named network: network is true or false")
        return config

    @classmethod
    def available(cls) -> bool:
        return shutil.which("bwrap") is not None

    def start(self) -> dict[str, Any]:
        root = self.config["root"]
        if root is not None and not os.path.isdir(root):
            raise ServiceError("invalid_request", f"root {root!r} is not a directory on this agent")
        disk = self.config["disk"]
        setpriv = shutil.which("setpriv")
        # As root, bwrap would make the sandbox's root the host's: it runs as SANDBOX_UID instead.
        self.owner = SANDBOX_UID if os.geteuid() == 0 else None
        if self.owner is not None and setpriv is None:
            raise ServiceError("environment_error", "bubblewrap on a root agent needs setpriv (util-linux) "
                                                     "to run the sandbox as an unprivileged user")
        if self.owner is not None:
            options = self.config["bwrap_options"]
            binds = [options[i + 1] for i, option in enumerate(options[:-1]) if option in BIND_OPTIONS]
            for path, code in [(self.workdir_root, "environment_error"),
                               *((path, "invalid_request") for path in binds)]:
                if blocked := unreachable(path):
                    raise ServiceError(code, f"the sandbox runs as uid {SANDBOX_UID}, which cannot reach "
                                              f"{os.path.normpath(path)} (no search permission on {blocked})")
        # /work is a host directory: with `disk`, a tmpfs of that size, and /tmp another (bwrap's own
        # tmpfs takes no nr_inodes); without, the directory itself, mounted nosuid.
        self.workdir = hostdir.make(self.workdir_root, f"{self.instance_id}-", disk, required=bool(disk), owner=self.owner)
        if disk:
            self.tmp_dir = hostdir.make(self.workdir_root, f"{self.instance_id}-tmp-", disk, required=True, owner=self.owner)
            os.chmod(self.tmp_dir, 0o755)  # as bwrap's own tmpfs
        self.cwd = self.config["cwd"] or WORK
        self.groups = set()
        self.plant_seed()  # before the sandbox starts: nothing in it sees a half-made copy
        self.prefix = [
            *([setpriv, f"--reuid={self.owner}", f"--regid={self.owner}", "--clear-groups", "--"]
              if self.owner is not None else []),
            shutil.which("bwrap"),
            # bwrap's own / is a tmpfs, so mount points for /work and the rest can be made.
            *(read_only_binds(root, sorted(set(os.listdir(root)) - set(OWN_DIRS))) if root
              else read_only_binds("/", HOST_DIRS)),
            "--proc", "/proc", "--dev", "/dev", *(["--bind", self.tmp_dir, "/tmp"] if disk else ["--tmpfs", "/tmp"]),
            "--bind", self.workdir, WORK,
            "--unshare-all", *(["--share-net"] if self.config["network"] else []),
            *(["--unshare-user", "--uid", "0", "--gid", "0"] if self.owner is not None else []), "--cap-drop", "ALL",
            "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "--setenv", "HOME", WORK,
            *self.config["bwrap_options"],
        ]
        if self.config["fast_exec"]:
            self.host_dir = hostdir.make(self.workdir_root, f"{self.instance_id}-exec-", hostdir.helper_dir_mib(self.config),
                                         owner=self.owner)
            self.helper = ExecHelper(self.host_dir, pid_one=True, owner=self.owner)
            self.start_helper_process(self._helper_sandbox())
        self.shell = self.config["shell"] or (self.helper.best_shell if self.helper else
                                              "bash" if os.path.exists(os.path.join(root or "/", "bin/bash")) else "sh")
        return {"workdir": self.workdir, "shell": self.shell, "fast_exec": self.helper is not None}

    def _helper_sandbox(self):
        """The sandbox that runs the helper for the instance's life. --as-pid-1: the helper is its
        PID 1, which no command can signal. Its environment starts with the agent's mark, which the
        sandbox's clear environment would drop: a helper that outlives its bwrap and agent (a kill
        that lands while bwrap sets up --die-with-parent; the chaos test left one) is then found and
        killed by the next agent's reap. The helper's loop unsets it, so no command sees it."""
        return [*self.prefix, "--as-pid-1", "--setenv", AGENT_MARK, os.environ.get(AGENT_MARK, ""),
                "--bind", self.host_dir, MOUNT, "--chdir", self.cwd, *helper_argv()]

    def restart_helper(self) -> None:
        """The helper is the sandbox's PID 1, which nothing inside can signal: the sandbox was
        killed from outside, and its processes and /tmp went with it. The instance is lost (a
        command answered from a new sandbox would describe another machine than the one the earlier
        commands built), unless its spec asks for `revive`: then a new sandbox over the same /work."""
        if not self.config["revive"]:
            raise ServiceError("instance_lost", "the instance's sandbox was killed from outside: its processes and "
                                                 "/tmp are gone (`revive: true` in a spec starts a new sandbox instead)")
        self.start_helper_process(self._helper_sandbox())

    def command_context(self, cwd: str | None, env: dict[str, str] | None) -> tuple[str, dict[str, str]]:
        # Sandboxes start with a clear environment (--clearenv): every command is given the spec's env.
        return resolve_path(cwd, self.cwd) if cwd else self.cwd, {**self.config["env"], **(env or {})}

    def spawn_without_helper(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                             output_limit: int) -> Watched | None:
        """fast_exec false: a new sandbox per command, a host process."""
        cwd, variables = self.command_context(cwd, env)
        check_command(command, variables)
        argv = [*self.prefix, "--chdir", cwd]
        for name, value in variables.items():
            argv += ["--setenv", name, value]
        return process.Command([*argv, *shell_argv(self.shell, command)], timeout=timeout, output_limit=output_limit,
                               groups=self.groups)

    def host_dirs(self) -> dict[str, str]:
        # /tmp only where it is a host directory (with `disk`): bwrap's own tmpfs is not seen from the host.
        return {name: path for name, path in (("work", self.workdir), ("tmp", self.tmp_dir)) if path}

    def _beneath_work(self, path):
        """Files are exchanged through the work directory, the one place the host can see: the
        instance's path, relative to it. safefs walks it on the host without following links."""
        inside = os.path.normpath(resolve_path(path, self.cwd))
        if os.path.commonpath([inside, WORK]) != WORK:
            raise ServiceError("invalid_request", f"bubblewrap instances exchange files under {WORK} only, not {path}")
        return os.path.relpath(inside, WORK)

    def write_file(self, path: str, content: bytes, mode: int) -> dict[str, Any]:
        fd = safefs.open_beneath(self.workdir, self._beneath_work(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                 mode, make_parents=True, shown=path, owner=self.owner)
        safefs.write_all(fd, content, mode)
        return {"path": path, "written": len(content)}

    def read_file(self, path: str, limit: int) -> dict[str, Any]:
        fd = safefs.open_beneath(self.workdir, self._beneath_work(path), os.O_RDONLY, shown=path)
        return {"content": safefs.read_limited(fd, limit, path)}

    def close(self) -> None:
        self.close_helper()
        for pgid in list(self.groups):
            process.kill_group(pgid)
        for directory in (self.workdir, self.tmp_dir, self.host_dir):
            if directory:
                hostdir.remove(directory)

