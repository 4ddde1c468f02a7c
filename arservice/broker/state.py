"""The broker's state: agents, instances, requests in flight, and resource accounting.

Plain objects, owned by the broker loop alone, so nothing here needs a lock.
"""

import time
from dataclasses import InitVar, dataclass, field
from enum import Enum
from typing import Any, cast

from ..protocol import ServiceError

RESOURCES = ("instances", "cpus", "memory")


class State(str, Enum):
    """Where an instance is in its life; Instance's methods below are the moves between them.

    A str, so that it is its name on the wire, in JSON and in logs."""
    STARTING = "starting"
    POOLED = "pooled"            # started for a warm pool, not yet handed out to a client
    RUNNING = "running"
    UNREACHABLE = "unreachable"  # its agent is silent (stopped, cut off) within --agent-grace
    CLOSING = "closing"
    # Ends: the record stays a while, so that requests on it say why it is gone.
    EXPIRED = "expired"          # its lease (ttl or idle timeout) ran out
    LOST = "lost"                # its agent or its environment went away

    def __str__(self) -> str:  # its value in f-strings on every Python (3.12 changed the default)
        return self.value


ENDED_STATES = (State.EXPIRED, State.LOST)


# CPUs are counted in integer thousandths, so that fractions add up and give back exactly
# (0.1 + 0.2 - 0.1 - 0.2 is not 0 in floats); everything the broker shows is in whole CPUs.
MILLI = 1000
# Resource name -> amount (None: not limited), as users give them or in the broker's units.
Amounts = dict[str, Any]


def to_units(amounts: Amounts) -> Amounts:
    """Resource amounts as users give them (cpus may be fractional) -> the broker's integer units."""
    return {name: amount if name != "cpus" or amount is None else round(amount * MILLI) for name, amount in amounts.items()}


def from_units(amounts: Amounts) -> Amounts:
    """The broker's units -> what users read (cpus as a number of CPUs)."""
    return {name: amount if name != "cpus" or amount is None else amount / MILLI for name, amount in amounts.items()}


def cost_of(config: dict[str, Any]) -> Amounts:
    """What one instance of this parsed environment config takes from the pool, in the broker's units."""
    return to_units({"instances": 1, "cpus": config["cpus"] or 0, "memory": config["memory"] or 0})


@dataclass(eq=False)  # records are compared by identity: one object per agent
class Agent:
    identity: bytes  # its ROUTER identity
    agent_id: str
    capacity: Amounts  # resource -> amount; None means "not limited by this agent"
    env_types: list[str]
    hostname: str | None
    pid: int | None
    slurm_job_id: str | None
    registered_at: float  # monotonic
    last_seen: float = field(init=False)
    used: Amounts = field(init=False, default_factory=lambda: dict.fromkeys(RESOURCES, 0))
    instance_ids: set[str] = field(init=False, default_factory=set)
    draining: bool = field(init=False, default=False)  # released by its runner: takes no new instances
    unreachable_since: float | None = field(init=False, default=None)  # monotonic time it fell silent

    def __post_init__(self) -> None:
        self.last_seen = self.registered_at

    def shortfall(self, cost: Amounts) -> str | None:
        """The first resource this agent lacks for `cost`, or None if it fits."""
        for name in RESOURCES:
            cap = self.capacity.get(name)
            if cap is not None and self.used[name] + cost[name] > cap:
                return name
        return None

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id, "hostname": self.hostname, "pid": self.pid,
            "slurm_job_id": self.slurm_job_id, "env_types": self.env_types,
            "capacity": from_units(self.capacity), "used": from_units(self.used), "instances": len(self.instance_ids),
            "last_seen_s": round(now - self.last_seen, 3), "registered_s": round(now - self.registered_at, 3),
            "draining": self.draining,
        }


@dataclass(eq=False)
class Instance:
    instance_id: str
    agent_id: str
    spec: dict[str, Any]    # as the user gave it (preset resolved): what the agent builds from
    config: dict[str, Any]  # spec parsed, with defaults
    ttl_s: InitVar[float | None] = None
    idle_s: float | None = None  # seconds it may go without a request (None: no limit)
    pooled_for: str | None = None  # the preset whose warm pool it waits in, until handed out
    state: State = field(init=False, default=State.STARTING)
    ended_at: float | None = field(init=False, default=None)  # wall time it became lost or expired
    info: dict[str, Any] = field(init=False, default_factory=dict)
    last_command: float | None = field(init=False, default=None)  # wall time of the last command's answer
    commands: int = field(init=False, default=0)
    cost: Amounts = field(init=False)
    created: float = field(init=False)
    expires_at: float | None = field(init=False)
    last_used: float = field(init=False)  # monotonic

    def __post_init__(self, ttl_s: float | None) -> None:
        self.cost = cost_of(self.config)
        self.start_lease(ttl_s, self.idle_s)

    def start_lease(self, ttl_s: float | None, idle_s: float | None) -> None:
        """Its life starts now (at its start, or when a warm pool hands it out): a hard end (ttl,
        None: none) and how long it may go without a request, in monotonic time."""
        self.created = time.time()
        now = time.monotonic()
        self.expires_at = None if ttl_s is None else now + ttl_s
        self.idle_s = idle_s
        self.last_used = now

    # -- its life: each move named for what causes it ---------------------------------------

    def started(self) -> None:
        """Its agent started it (or brought it back after a broker restart): a warm pool's waits."""
        self.state = State.POOLED if self.pooled_for else State.RUNNING
        self.last_used = time.monotonic()

    def handed_out(self, ttl_s: float | None, idle_s: float | None) -> None:
        """A start of its preset took it from its warm pool: it is a client's, its lease starts now."""
        self.state, self.pooled_for = State.RUNNING, None
        self.start_lease(ttl_s, idle_s)

    def agent_silent(self) -> None:
        if self.state == State.RUNNING:
            self.state = State.UNREACHABLE

    def agent_back(self, now: float) -> None:
        if self.state == State.UNREACHABLE:
            self.state = State.RUNNING
            self.last_used = now  # its owner could not use it meanwhile: the idle clock starts again

    def closing(self) -> None:
        self.state = State.CLOSING

    def ended(self, state: State, wall: float) -> None:
        """Expired or lost, at wall time `wall`; an expired one being closed stays expired (why it went)."""
        if self.state != State.EXPIRED:
            self.state, self.ended_at = state, wall

    def describe(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id, "agent_id": self.agent_id, "type": self.config["type"],
            "state": self.state.value, "created": self.created, "info": self.info,
            "last_command": self.last_command, "commands": self.commands, **self.lease(time.monotonic()),
        }

    def lease(self, now: float) -> dict[str, Any]:
        """Seconds left before the instance expires (None: never), for users to read."""
        left = [end - now for end in (self.expires_at, self.idle_s and self.last_used + self.idle_s) if end]
        return {"expires_in_s": round(max(0.0, min(left)), 3) if left else None, "idle_timeout": self.idle_s}

    def lease_over(self, now: float) -> str | None:
        """Why the lease ended, or None while it holds."""
        if self.expires_at is not None and now >= self.expires_at:
            return "ttl"
        if self.idle_s is not None and now - self.last_used >= self.idle_s:
            return "idle"
        return None


@dataclass(eq=False)
class Pending:
    """A request forwarded to an agent, waiting for the agent's answer."""
    kind: str
    envelope: list[bytes] | None  # the client's ROUTER envelope; None when nobody waits for the answer
    client_id: object
    agent_id: str
    instance_id: str
    deadline: float  # monotonic
    env_type: str | None = None  # the instance's backend, for metrics (the instance may be gone by the answer)
    forks: tuple[str, ...] | list[str] = ()  # fork_instance: the ids of the new instances
    sent: float = field(init=False, default_factory=time.monotonic)


@dataclass
class Snapshot:
    """A named copy of an instance's files, kept by the agent that made it: starts from it go there."""
    name: str
    agent_id: str
    type: str
    source: str  # the instance it was taken from
    ready: bool = False  # the agent said it is made

    def describe(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "type": self.type, "source": self.source, "ready": self.ready}


@dataclass(eq=False)
class WaitingStart:
    """A start that found no agent with room, waiting for one (a runner may be bringing it)."""
    envelope: list[bytes]
    client_id: object
    spec: dict[str, Any]
    config: dict[str, Any]
    wait_s: float
    deadline: float = field(init=False)  # monotonic

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.wait_s


class Pool:
    """Agents and instances, with the accounting that ties them to the service-wide limits."""

    def __init__(self, limits: Amounts) -> None:
        self.limits = to_units({name: limits[name] for name in RESOURCES if limits.get(name) is not None})
        self.agents: dict[bytes, Agent] = {}
        self.instances: dict[str, Instance] = {}
        self.used = dict.fromkeys(RESOURCES, 0)

    def check_limits(self, cost: Amounts) -> None:
        """Raise no_capacity if `cost` would take the service past --max-resources."""
        for name, cap in self.limits.items():
            if self.used[name] + cost[name] > cap:
                used, limit = from_units({name: self.used[name]})[name], from_units({name: cap})[name]
                raise ServiceError("no_capacity", f"service limit reached: {name} ({used:g} of {limit:g} in use)")

    def place(self, env_type: str, cost: Amounts) -> Agent:
        """Pick the agent for a new instance, or raise no_capacity naming what ran out."""
        able = [a for a in self.agents.values()
                if env_type in a.env_types and not a.draining and a.unreachable_since is None]
        if not able:
            raise ServiceError("no_capacity", f"no registered agent runs {env_type!r} environments")
        fitting = [a for a in able if a.shortfall(cost) is None]
        if not fitting:
            short = sorted({cast(str, a.shortfall(cost)) for a in able})  # none fits: each lacks one
            raise ServiceError("no_capacity", f"every agent that runs {env_type!r} is out of {', '.join(short)}")
        return min(fitting, key=lambda a: (a.used["instances"] / (a.capacity.get("instances") or 1), a.registered_at))

    def admit(self, instance: Instance, agent: Agent) -> None:
        agent.instance_ids.add(instance.instance_id)
        self.instances[instance.instance_id] = instance
        self._charge(agent, instance.cost, +1)

    def release(self, instance: Instance) -> None:
        """Give an instance's resources back; the record stays only if it ended (lost or expired)."""
        agent = self.agent_by_id(instance.agent_id)
        if agent is not None and instance.instance_id in agent.instance_ids:
            agent.instance_ids.discard(instance.instance_id)
            self._charge(agent, instance.cost, -1)
        if instance.state not in ENDED_STATES:
            self.instances.pop(instance.instance_id, None)

    def drop_agent(self, agent: Agent) -> None:
        """Forget an agent: its instances become lost and its capacity leaves the pool."""
        del self.agents[agent.identity]
        wall = time.time()
        for instance_id in agent.instance_ids:
            self.instances[instance_id].ended(State.LOST, wall)
        agent.instance_ids.clear()
        for name in RESOURCES:
            self.used[name] -= agent.used[name]

    def agent_by_id(self, agent_id: str) -> Agent | None:
        return self.agents.get(agent_id.encode())

    def _charge(self, agent: Agent, cost: Amounts, sign: int) -> None:
        for name in RESOURCES:
            agent.used[name] += sign * cost[name]
            self.used[name] += sign * cost[name]

    def capacity(self) -> Amounts:
        """Service-wide capacity: the agents' sum, capped by the limits."""
        total: Amounts = {}
        for name in RESOURCES:
            caps: list[Any] = [a.capacity.get(name) for a in self.agents.values()]
            agents_sum = None if any(c is None for c in caps) else sum(caps)
            limit = self.limits.get(name)
            total[name] = limit if agents_sum is None else agents_sum if limit is None else min(limit, agents_sum)
        return total

    def describe(self, now: float) -> dict[str, Any]:
        total = self.capacity()
        states = {state.value: 0 for state in State}
        for inst in self.instances.values():
            states[inst.state.value] += 1
        return {
            "limits": from_units(self.limits),
            "total": from_units(total),
            "used": from_units(self.used),
            "available": from_units({k: None if total[k] is None else max(0, total[k] - self.used[k]) for k in RESOURCES}),
            "agents": [a.describe(now) for a in self.agents.values()],
            "instances": states,
        }
