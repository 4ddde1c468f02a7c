"""The one small base class every environment backend implements.

An environment instance belongs to one agent. The agent calls `start` once, then `spawn`
(on its event loop) or `execute`, `write_file` and `read_file` (from many threads at once),
then `close` once.
`parse_config` is pure and cheap: the broker calls it too, to refuse a bad spec
before any agent sees it.
"""

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, Field

from ..protocol import ServiceError
from ..schemas import STRICT, Bytes, Seconds, Text, Variables, validated
from . import hostdir

if TYPE_CHECKING:
    from .process import Watched

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_OUTPUT_LIMIT = 1 << 20
DEFAULT_START_TIMEOUT_S = 300.0


# Bounds that keep every number a backend is given usable (a timer, a cgroup value, an int).
MAX_AMOUNT = 1e9
MAX_MEMORY_MIB = 1 << 40

LIMITS = ("cpus", "memory", "pids", "network", "disk")


def _shell(value: str | list[str]) -> str | list[str]:
    if not value or not value[0]:
        raise ValueError("must be a shell's name or an argv prefix whose first word is one")
    return value


# Sizes, as memory's: "512m", "2g" or MiB as a number; normalised to whole MiB.
Amount = Annotated[float, Field(gt=0, le=MAX_AMOUNT)]
Size = Annotated[int | float | str, AfterValidator(lambda value: parse_memory_mib(value))]
DiskSize = Annotated[int | float | str, AfterValidator(lambda value: parse_memory_mib(value, "disk"))]
Shell = Annotated[Text | list[Text], AfterValidator(_shell), Field(description=(
    "A shell's name, run as `NAME -c COMMAND`, or an argv prefix the command is appended to as the "
    "last argument ([\"bash\", \"-lc\"]: a login shell per command)."))]
Words = list[Text]


class Spec(BaseModel):
    """An environment spec: the fields every backend takes. Each backend's spec model adds its own."""

    model_config = STRICT
    type: str = Field(description="The backend: local, docker, podman, singularity (apptainer), enroot, bubblewrap.")
    cwd: Text | None = Field(None, description="The instance's working directory (default: one made for it, "
                                               "or the image's).")
    env: Variables = Field(default_factory=dict)
    timeout: Seconds = Field(DEFAULT_TIMEOUT_S, description="A command's timeout where execute gives none.")
    output_limit: Bytes = Field(DEFAULT_OUTPUT_LIMIT, description="A command's output limit where execute gives none.")
    start_timeout: Seconds = DEFAULT_START_TIMEOUT_S
    ttl: Seconds | None = Field(None, description="Seconds the instance lives from its start (default: --instance-ttl).")
    idle_timeout: Seconds | None = Field(None, description="Seconds it may go without a request (default: --idle-timeout).")
    # Limits: enforced by the backend, and counted against the agent's and service's capacity.
    cpus: Amount | None = None
    memory: Size | None = Field(None, description="\"512m\", \"2g\" or MiB as a number.")
    pids: int | None = Field(None, gt=0, le=MAX_AMOUNT)
    network: bool | Text | None = Field(None, description="Off by default where the backend isolates.")
    disk: DiskSize | None = Field(None, description="What the instance may write on the host; sizes as memory's.")
    snapshot: Text | None = Field(None, description="Start from a snapshot_instance's files, by name.")


SpecModel = type[Spec]  # (in Environment's body, `type` is the backend's name)


def is_variable_name(name: str) -> bool:
    """A name a shell takes as a variable's (one that is not, it drops from the environment it passes on)."""
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None


def check_command(command: str, env: dict[str, str]) -> None:
    """Refuse what no exec could pass: a NUL byte in the command or a variable, a bad variable name."""
    bad = [name for name in env if not is_variable_name(name)]
    if bad:
        raise ServiceError("invalid_request", f"not a valid environment variable name: {bad[0]!r}")
    if "\0" in command or any("\0" in value for value in env.values()):
        raise ServiceError("invalid_request", "a command or variable cannot hold a NUL byte (no exec can pass one)")


def shell_argv(shell: str | Sequence[str], command: str) -> list[str]:
    """The argv that runs `command` in `shell` (a name or an argv prefix, as the spec's `shell` takes)."""
    return [shell, "-c", command] if isinstance(shell, str) else [*shell, command]


class Environment:
    type: str = None  # type: ignore[assignment]  # the name users put in "type"; set by each backend
    can_fork = False  # whether its files can be copied for forks and snapshots
    # Whether start() may run on a short-lived thread: not where it starts host processes that die
    # with the thread that made them (bwrap --die-with-parent is PR_SET_PDEATHSIG, a thread's death).
    starts_in_threads = False
    seed: dict[str, Any] | None = None  # a snapshot's handle (snapshot()) that start() begins from, or None: the image as it is
    # Which of LIMITS this backend can enforce; asking for another one is an error.
    enforces: set[str] = set()
    # What its agent keeps for a restarted broker to adopt it: the spec it started from, and what
    # start() told of it.
    spec: dict[str, Any]
    info: dict[str, Any]
    # Its spec's fields, with their types, defaults, bounds and docs. Backends subclass Spec.
    spec_model: ClassVar[SpecModel] = Spec

    @classmethod
    def parse_config(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """Validate a spec dict and return it complete with defaults."""
        config: dict[str, Any] = validated(cls.spec_model, spec, f"{cls.type} environment field").model_dump()
        asked = [name for name in LIMITS if config[name] is not None and name not in cls.enforces]
        if asked:
            raise ServiceError("invalid_request", f"{cls.type} environments cannot enforce {', '.join(asked)}")
        if config["snapshot"] is not None and not cls.can_fork:
            raise ServiceError("invalid_request", f"{cls.type} environments cannot start from a snapshot")
        return config

    @classmethod
    def available(cls) -> bool:
        """Whether this host can run the backend (its tools are installed)."""
        return True

    @classmethod
    def reap(cls, host: str, alive: Callable[[int], bool]) -> list[str]:
        """Remove what dead agents of `host` left behind (alive(pid) tells); return what was removed."""
        return []

    def __init__(self, instance_id: str, config: dict[str, Any], agent_id: str, workdir_root: str) -> None:
        self.instance_id = instance_id
        self.config = config
        self.agent_id = agent_id
        self.workdir_root = workdir_root

    def start(self) -> dict[str, Any]:
        """Bring the instance up; return a dict of facts worth telling the user (may be empty)."""
        raise NotImplementedError

    def spawn(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
              output_limit: int) -> "Watched | None":
        """Start a shell command and return it as a process.Watched, or None.

        Backends that can hand over a command as file descriptors to watch (a host process, a
        command through the exec helper) implement this: the agent then drives the command from
        its event loop, with no thread per command. Where it returns None, the agent calls
        `execute` on a worker thread, which runs it through `plain_execute`.
        """
        return None

    def execute(self, command: str, timeout: float, cwd: str | None = None, env: dict[str, str] | None = None,
                output_limit: int | None = None) -> dict[str, Any]:
        """Run a shell command on this thread; return {output: bytes, returncode, timed_out,
        truncated, duration_s}. What is not given comes from the instance's spec, here only: the
        backends' spawn and plain_execute are always given every argument."""
        output_limit = output_limit or self.config["output_limit"]
        started = self.spawn(command, timeout, cwd, env, output_limit)
        if started is None:
            return self.plain_execute(command, timeout, cwd, env, output_limit)
        return started.wait()

    def plain_execute(self, command: str, timeout: float, cwd: str | None, env: dict[str, str] | None,
                      output_limit: int) -> dict[str, Any]:
        """`execute` where spawn() returns None: one exec through the backend's tool (docker exec, say)."""
        raise NotImplementedError

    def write_file(self, path: str, content: bytes, mode: int) -> dict[str, Any]:
        """Write bytes to path (relative to the instance's cwd); return {path, written}."""
        raise NotImplementedError

    def read_file(self, path: str, limit: int) -> dict[str, Any]:
        """Return {content: bytes} of at most `limit` bytes; raise ServiceError("payload_too_large") past it."""
        raise NotImplementedError

    # -- forks and snapshots: an instance's files, for other instances to start from ----------

    def host_dirs(self) -> dict[str, str]:
        """The host directories that hold the instance's files, by role ("work", "tmp"): what
        snapshots copy, where a backend keeps no files of its own (a container engine does)."""
        return {}

    def snapshot(self, directory: str | None = None) -> dict[str, Any]:
        """The instance's files now, as a handle a start can begin from (`seed`): copies in
        `directory` (they outlive the instance: drop_snapshot removes them), or without one, the
        live directories themselves, which each fork's start copies (fork)."""
        if not self.can_fork:
            raise ServiceError("invalid_request", f"{self.type} instances cannot be forked or snapshotted")
        dirs = self.host_dirs()
        if directory is None:
            return {"dirs": dirs}
        copies: dict[str, str] = {}
        for role, path in dirs.items():
            copies[role] = os.path.join(directory, role)
            os.makedirs(copies[role], mode=0o755)
            hostdir.copy_tree(path, copies[role], self.config["start_timeout"])
        return {"dirs": copies, "directory": directory}

    @classmethod
    def drop_snapshot(cls, handle: dict[str, Any]) -> None:
        """Remove a named snapshot's copies."""
        hostdir.remove_tree(handle["directory"])

    def plant_seed(self) -> None:
        """In start(), once the instance's directories exist: copy the seed's files into them."""
        for role, path in (self.seed or {}).get("dirs", {}).items():
            target = self.host_dirs().get(role)
            if target:
                hostdir.copy_tree(path, target, self.config["start_timeout"])

    def fork(self, forks: list["Environment"]) -> list[dict[str, Any]]:
        """Start `forks` (new, unstarted instances of this backend with this config) from this
        instance's files as they are now; return each one's start info. Processes are not copied."""
        seed = self.snapshot()
        for fork in forks:
            fork.seed = seed
        if not self.starts_in_threads:
            return [fork.start() for fork in forks]
        with ThreadPoolExecutor(len(forks)) as threads:
            starts = [threads.submit(fork.start) for fork in forks]
        return [start.result() for start in starts]

    def close(self) -> None:
        """Stop the instance and remove everything it made. Must be safe to call twice."""
        raise NotImplementedError

    def session_dir(self) -> tuple[str, str, int | None, bool]:
        """Where persistent sessions keep their FIFOs and files: (host path, the same directory as
        the instance sees it, the uid owning the instance's files or None, whether it is the
        sessions' own to remove). Backends with an exec helper share its directory (helper.py)."""
        raise NotImplementedError


def parse_memory_mib(value: object, field: str = "memory") -> int | None:
    """'512m', '2g', '1024k' or a number of MiB -> MiB as an int; None stays None."""
    if value is None:
        return None
    mib: object = 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        mib = value
    elif isinstance(value, str):
        units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
        text = value.strip().lower().removesuffix("b").removesuffix("i")
        number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "m")
        try:
            mib = float(number) * units[unit]
        except ValueError:
            pass
    if isinstance(mib, (int, float)) and 1 <= mib <= MAX_MEMORY_MIB:  # NaN fails both
        return int(mib)
    raise ServiceError("invalid_request", f"{field} must be like '512m' or '2g' or MiB as a number (1 MiB to 1 EiB), not {value!r}")


def resolve_path(path: str, cwd: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cwd, path)
