"""Every request a client sends, declared once as a typed schema.

Each model validates its message (protocol.py's envelope fields aside): unknown fields are
refused, numbers must be finite and in range, integers within 64 bits, and strings that reach a
command line, a path or an environment hold no NUL. A field given as null counts as absent. The
same models carry each field's doc and make the OpenAPI document (http/openapi.py), so the
broker, the HTTP API and its description cannot disagree. Environment specs are declared the
same way, one model per backend (environments.base.Spec).
"""

import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .protocol import (
    CLOSE_INSTANCE,
    CLOSE_SESSION,
    CREATE_SESSION,
    DELETE_SNAPSHOT,
    ENVELOPE_FIELDS,
    EXECUTE,
    FORK_INSTANCE,
    INSTANCES,
    MAX_INT,
    MAX_SECONDS,
    METRICS,
    PING,
    READ_FILE,
    RELEASE_AGENT,
    RENEW,
    RESOURCES,
    RUN_IN_SESSION,
    RUNNER_STATUS,
    SNAPSHOT_INSTANCE,
    START_INSTANCE,
    STATUS,
    WRITE_FILE,
    Message,
    ServiceError,
    check_value,
    environment_map,
)

# Bounds of request fields (each has this one owner).
MAX_OUTPUT_LIMIT = 64 << 20  # the most output a command may return, and the most of a file a read may
MAX_FORKS = 64  # the most instances one fork_instance makes
MAX_START_WAIT_S = 3600.0  # the longest a start may wait for room when it asks (wait_s), whatever --start-wait says
SNAPSHOT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # it names a directory on the agent
SESSION_NAME = r"[A-Za-z0-9_.-]{1,64}"  # it names the session's FIFOs and files
DEFAULT_SESSION = "default"

# What every message model takes: unknown fields refused, no conversions (a "5" is not 5, true
# is not 1), no NaN or infinity.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _without_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def _environment(value: dict[str, str]) -> dict[str, str]:
    try:
        return environment_map(value, "env")
    except ServiceError as exc:
        raise ValueError(exc.message.removeprefix("field 'env' ").removeprefix("field 'env': ")) from None


def finite_everywhere(value: Any) -> Any:
    try:
        return check_value(value, "")
    except ServiceError as exc:
        raise ValueError("holds a NUL byte or a number that is not finite") from exc


# Strings that reach an argv, a path or an environment.
Text = Annotated[str, AfterValidator(_without_nul)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, description="Seconds, more than 0, at most a day.")]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Bytes = Annotated[int, Field(gt=0, le=MAX_OUTPUT_LIMIT, description="Bytes, more than 0, at most 64 MiB.")]
Variables = Annotated[dict[str, str], AfterValidator(_environment),
                      Field(description="Environment variables: names non-empty, without '=' or NUL; values without NUL.")]
InstanceId = Annotated[str, Field(description="The instance, as start_instance named it.")]
SessionName = Annotated[str, Field(pattern=f"^{SESSION_NAME}$", description="a session name: 1 to 64 of A-Z a-z 0-9 _ . -")]


class Request(BaseModel):
    """Fields of a client request besides the envelope (v, type, id, token)."""

    model_config = STRICT


class OnInstance(Request):
    instance_id: InstanceId


class StartInstance(Request):
    """Start an instance: from a preset (--environments) by name, or from a spec."""

    environment: Annotated[str | dict[str, Any], AfterValidator(finite_everywhere)] = Field(
        description="A preset's name, or an environment spec: {\"type\": ..., ...}, the fields of its "
                    "type (components: the *Spec schemas).")
    wait_s: float | None = Field(None, ge=0, le=MAX_START_WAIT_S, description=(
        "Seconds to wait for room when there is none now (default: the service's --start-wait); "
        "starts of a type are served first come, first served."))


class Execute(OnInstance):
    """Run a shell command in the instance, as `bash -c` would (its shell: the spec's `shell`)."""

    command: Text = Field(description="Run as `SHELL -c COMMAND` (the spec's shell), in a fresh shell each time.")
    timeout: Seconds | None = Field(None, description="Seconds before the command's process tree is killed "
                                                      "(default: the spec's timeout).")
    cwd: Text | None = Field(None, description="Its working directory, relative to the instance's (default: the instance's).")
    env: Variables | None = None
    output_limit: Bytes | None = Field(None, description="The most output kept: past it, its head and tail "
                                                         "(default: the spec's output_limit).")
    stream: bool = Field(False, description="Send the output as it comes (ZMQ: chunk messages; HTTP: JSON lines).")


class CloseInstance(OnInstance):
    """Stop the instance and remove everything it made."""


class Renew(OnInstance):
    """Keep the instance's lease: its idle clock starts again; a ttl gives it that many seconds from now."""

    ttl: Seconds | None = None


class ForkInstance(OnInstance):
    """New instances whose files are copies of this one's, on its agent."""

    count: int = Field(1, ge=1, le=MAX_FORKS)


class SnapshotInstance(OnInstance):
    """Keep a named copy of the instance's files, for later starts (spec field `snapshot`)."""

    name: str = Field(pattern=f"^{SNAPSHOT_NAME}$", description="a snapshot name: 1 to 64 letters, digits, '_', "
                                                                  "'.' or '-', starting with a letter or digit")


class DeleteSnapshot(Request):
    """Remove a named snapshot no running instance uses."""

    name: str


class WriteFile(OnInstance):
    """Write a file in the instance (HTTP: text, or base64 with "base64": true)."""

    path: Text = Field(description="Relative to the instance's working directory, or absolute.")
    content: bytes | str = Field(description="The file's bytes (HTTP: UTF-8 text, or base64 with \"base64\": true).")
    mode: int = Field(0o644, ge=0, le=0o7777, description="Permission bits, like 0o644 (420).")


class ReadFile(OnInstance):
    """Read a file of the instance (HTTP: text, or base64 with "base64": true)."""

    path: Text = Field(description="Relative to the instance's working directory, or absolute.")
    limit: Bytes = Field(MAX_OUTPUT_LIMIT, description="The most bytes to read: a larger file is payload_too_large.")


class CreateSession(OnInstance):
    """A persistent bash in the instance: cwd, variables and functions persist between its commands."""

    session: SessionName = DEFAULT_SESSION
    shell: Text | None = Field(None, description="A bash, by name or path (default bash).")


class RunInSession(OnInstance):
    """Run a command in a session's bash."""

    session: SessionName
    command: Text = Field(description="Run in the session's bash, as if typed there.")
    timeout: Seconds | None = Field(None, description="Seconds before the command is interrupted (default: the spec's timeout).")
    output_limit: Bytes | None = Field(None, description="The most output kept (default: the spec's output_limit).")
    stream: bool = Field(False, description="Send the output as it comes.")


class CloseSession(OnInstance):
    """End a session's bash."""

    session: SessionName


class Resources(Request):
    """Capacity and usage: the service's limits, each agent's, the instances by state, waiting starts, pools."""


class Instances(Request):
    """The instances matching every filter given, in instance id order, a page at a time."""

    state: Text | None = Field(None, description="starting, running, unreachable, closing, lost or expired.")
    agent_id: Text | None = None
    env_type: Text | None = Field(None, description="The spec's type.")
    after: Text = Field("", description="The cursor: list from after this instance id (the last page's `next`).")
    limit: int | None = Field(None, gt=0, le=MAX_INT, description="A page of at most this many.")


class Ping(Request):
    """Whether the service answers, and how many agents it has."""


class Status(Request):
    """Agents, instances, the runner's report and recent errors: what the status page shows."""


class Metrics(Request):
    """The broker's counters, gauges and histograms (GET /metrics renders them for Prometheus)."""


class RunnerStatus(Request):
    """A runner's report, shown as `runner` in resources (runners only)."""

    status: Annotated[dict[str, Any], AfterValidator(finite_everywhere)]


class ReleaseAgent(Request):
    """Take no new instances on an agent, so that its runner can stop it (runners only)."""

    agent_id: str
    drain: bool = Field(False, description="Even while it holds instances (its job nears its end).")


# Each client request type and its model.
REQUESTS: dict[str, type[Request]] = {
    START_INSTANCE: StartInstance,
    EXECUTE: Execute,
    CLOSE_INSTANCE: CloseInstance,
    RENEW: Renew,
    FORK_INSTANCE: ForkInstance,
    SNAPSHOT_INSTANCE: SnapshotInstance,
    DELETE_SNAPSHOT: DeleteSnapshot,
    WRITE_FILE: WriteFile,
    READ_FILE: ReadFile,
    CREATE_SESSION: CreateSession,
    RUN_IN_SESSION: RunInSession,
    CLOSE_SESSION: CloseSession,
    RESOURCES: Resources,
    INSTANCES: Instances,
    PING: Ping,
    STATUS: Status,
    METRICS: Metrics,
    RUNNER_STATUS: RunnerStatus,
    RELEASE_AGENT: ReleaseAgent,
}


# What the broker sends an agent: a client's request as validated, with the instance named and
# every default filled in (an agent never picks a default of its own).
class AgentStart(OnInstance):
    """Start this instance (its id chosen by the broker) from a spec."""

    environment: Annotated[dict[str, Any], AfterValidator(finite_everywhere)]


class AgentExecute(Execute):
    timeout: Seconds  # required here: the broker fills it in
    output_limit: Bytes


class AgentFork(OnInstance):
    """Fork the instance into new ones, with these ids."""

    new_ids: list[str] = Field(min_length=1, max_length=MAX_FORKS)


class AgentRunInSession(RunInSession):
    timeout: Seconds  # required here: the broker fills it in
    output_limit: Bytes


# Each request type an agent serves, and its model.
AGENT_REQUESTS: dict[str, type[Request]] = {
    START_INSTANCE: AgentStart,
    EXECUTE: AgentExecute,
    CLOSE_INSTANCE: CloseInstance,
    WRITE_FILE: WriteFile,
    READ_FILE: ReadFile,
    FORK_INSTANCE: AgentFork,
    SNAPSHOT_INSTANCE: SnapshotInstance,
    DELETE_SNAPSHOT: DeleteSnapshot,
    CREATE_SESSION: CreateSession,
    RUN_IN_SESSION: AgentRunInSession,
    CLOSE_SESSION: CloseSession,
}


class Capacity(BaseModel):
    """What an agent offers; null: not counted."""

    model_config = STRICT
    instances: Count | None = None
    cpus: Annotated[float, Field(ge=0, le=MAX_INT)] | None = None
    memory: Count | None = Field(None, description="MiB.")


class Register(Request):
    """An agent joins the broker (its secret, in the envelope, says it may)."""

    agent_id: str = Field(description="The agent's DEALER identity.")
    capacity: Capacity
    env_types: list[str]
    hostname: str = ""
    pid: int | None = Field(None, ge=0, le=MAX_INT)
    slurm_job_id: str | None = None
    instances: list[dict[str, Any]] = Field(default_factory=list, description=(
        "The instances it holds ({instance_id, environment, info}): a restarted broker adopts them."))
    snapshots: list[dict[str, Any]] = Field(default_factory=list, description="The snapshots it keeps ({name, type, source}).")


class HeldInstance(BaseModel):
    """One of register's `instances`: each is adopted, or refused, on its own."""

    model_config = STRICT
    instance_id: str
    environment: Annotated[dict[str, Any], AfterValidator(finite_everywhere)]
    info: Annotated[dict[str, Any], AfterValidator(finite_everywhere)] = Field(default_factory=dict)


class Heartbeat(Request):
    """Both ways, every heartbeat_s; an agent's says how many instances it holds."""

    instances: Count | None = None


class Disconnect(Request):
    """An agent leaves: its instances are gone."""


Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], fields: Mapping[str, Any], what: str = "field") -> Model:
    """`fields` (nulls as absent) as `model`; invalid_request naming the first field that is wrong
    otherwise. `what` names the fields in messages ("local environment field")."""
    return _checked(model, {name: value for name, value in fields.items() if value is not None}, what)


def _checked(model: type[Model], fields: dict[str, Any], what: str = "field") -> Model:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ServiceError("invalid_request", describe(model, exc, what)) from None


def describe(model: type[BaseModel], exc: ValidationError, what: str = "field") -> str:
    """The first error of a validation, in the words every error of the service uses: the field,
    what is wrong (its doc, where its value breaks a pattern), and the value given."""
    first = exc.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    if first["type"] == "missing":
        return f"missing required {what} '{name}'"
    if first["type"] == "extra_forbidden":
        return f"unknown {what} '{name}'"
    doc = model.model_fields[name].description if name in model.model_fields else None
    if first["type"] == "string_pattern_mismatch" and doc:
        problem = f"must be {doc}"
    elif first["type"].endswith("_type"):  # of a union, each member's: the same words for all
        problem = "has the wrong type"
    else:
        problem = re.sub(r"^(Value error, |Input )", "", first["msg"])
    given = repr(first["input"])
    return f"{what} '{name}' {problem}, not {given if len(given) <= 80 else given[:77] + '...'}"


def fields_of(msg: Message, model: type[Model]) -> Model:
    """A message's fields (all but the envelope's; nulls as absent) as `model`. One pass over the
    message: this runs for every request, in the broker and again in the agent."""
    return _checked(model, {name: value for name, value in msg.items()
                            if value is not None and name not in ENVELOPE_FIELDS})


def request_of(msg: Message) -> Request:
    """A client request's fields as its model."""
    return fields_of(msg, REQUESTS[msg["type"]])
