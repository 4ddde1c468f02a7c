"""What the broker counts for GET /metrics and the status page: plain numbers owned by the broker loop.

Counters and histograms are bumped where the broker answers a request; gauges (instances, agents,
pool, waiting starts, Slurm jobs) are computed from the broker's state when asked. `families()`
hands the lot out as plain lists (msgpack carries them over inproc) and the HTTP front end renders
Prometheus text from them (arservice/http/observe.py), off the loop. Nothing here takes a lock,
and nothing imports prometheus_client: agents import this package too.
"""

import bisect
import collections
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import protocol
from .state import RESOURCES, Agent, Pending, WaitingStart

if TYPE_CHECKING:
    from .broker import Broker

# Histogram bucket upper bounds, in seconds.
COMMAND_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
START_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOOP_LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

RECENT_ERRORS = 50
ERROR_MESSAGE_CHARS = 300  # messages may quote what an instance printed: keep the page's list small

# Requests forwarded to agents: the counter each answer goes to.
ANSWER_COUNTERS = {
    protocol.START_INSTANCE: "arservice_instance_starts_total",
    protocol.EXECUTE: "arservice_commands_total",
    protocol.CLOSE_INSTANCE: "arservice_instance_closes_total",
    protocol.FORK_INSTANCE: "arservice_instance_forks_total",
    protocol.SNAPSHOT_INSTANCE: "arservice_snapshots_total",
    protocol.WRITE_FILE: "arservice_file_requests_total",
    protocol.READ_FILE: "arservice_file_requests_total",
    protocol.CREATE_SESSION: "arservice_session_requests_total",
    protocol.RUN_IN_SESSION: "arservice_session_requests_total",
    protocol.CLOSE_SESSION: "arservice_session_requests_total",
}
# Counters that several request types share, labelled by the request.
PER_REQUEST = {"arservice_file_requests_total", "arservice_session_requests_total"}
LATENCY_HISTOGRAMS = {
    protocol.START_INSTANCE: "arservice_instance_start_duration_seconds",
    protocol.EXECUTE: "arservice_command_duration_seconds",
}
# Resource -> (metric name suffix, factor to the base unit): memory is counted in MiB, exported in bytes.
RESOURCE_UNITS = {"instances": ("instances", 1), "cpus": ("cpus", 1), "memory": ("memory_bytes", 1 << 20)}


def _resource_families() -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """arservice_{pool,agent}_{capacity,used}_{instances,cpus,memory_bytes}: the pool's size and use."""
    for resource, (unit, _) in RESOURCE_UNITS.items():
        what = {"instances": "Instances", "cpus": "CPUs", "memory": "Memory in bytes"}[resource]
        capacity_help = (f"{what} the service can hold: its agents' sum capped by --max-resources; "
                         "absent when some agent does not count them and there is no cap.")
        yield f"arservice_pool_capacity_{unit}", capacity_help, ()
        yield f"arservice_pool_used_{unit}", f"{what} in use, service-wide.", ()
        yield f"arservice_agent_capacity_{unit}", f"{what} an agent offers; absent when it does not count them.", ("agent",)
        yield f"arservice_agent_used_{unit}", f"{what} in use on an agent.", ("agent",)


# name -> (type, help, label names). The order is the order of GET /metrics.
FAMILIES = {
    "arservice_instances": ("gauge", "Instances known to the broker.", ("state", "type", "agent")),
    "arservice_instance_starts_total": ("counter", ("Starts answered after placement on an agent, by outcome (ok or the "
                                                    "error code); refusals before placement are in arservice_errors_total."),
                                        ("type", "outcome")),
    "arservice_commands_total": ("counter", "Commands answered, by outcome (ok, timed_out, or the error code).",
                                 ("type", "outcome")),
    "arservice_instance_closes_total": ("counter", "Closes answered by an agent, by outcome.", ("type", "outcome")),
    "arservice_instance_forks_total": ("counter", "fork_instance requests answered by an agent, by outcome.",
                                       ("type", "outcome")),
    "arservice_snapshots_total": ("counter", "snapshot_instance requests answered by an agent, by outcome.",
                                  ("type", "outcome")),
    "arservice_file_requests_total": ("counter", "write_file and read_file requests answered, by outcome.",
                                      ("request", "type", "outcome")),
    "arservice_session_requests_total": ("counter", ("create_session, run_in_session and close_session requests "
                                                     "answered, by outcome."), ("request", "type", "outcome")),
    "arservice_instances_expired_total": ("counter", "Instances closed because their lease ended, by reason (ttl or idle).",
                                          ("reason",)),
    "arservice_agents_unreachable_total": ("counter", "Agents that fell silent (their instances became unreachable).", ()),
    "arservice_errors_total": ("counter", ("Error answers from the broker, by request type and error code (the HTTP "
                                           "front end's own 401, 404 and 413 are not counted)."), ("request", "code")),
    "arservice_instance_start_duration_seconds": ("histogram", "From placing a start on an agent to its answer.",
                                                  ("type",)),
    "arservice_command_duration_seconds": ("histogram", "From forwarding a command to an agent to its answer.",
                                           ("type",)),
    "arservice_agents": ("gauge", "Agents registered now (draining: released by their runner).", ("state",)),
    "arservice_agents_registered_total": ("counter", "Agent registrations.", ()),
    "arservice_agents_lost_total": ("counter", "Agents gone; expected=\"true\" for the ones their runner released.",
                                    ("expected",)),
    **{name: ("gauge", help_text, labels) for name, help_text, labels in _resource_families()},
    "arservice_waiting_starts": ("gauge", "Starts waiting for an agent with room.", ("type",)),
    "arservice_warm_pool_instances": ("gauge", ("A warm pool's instances: ready (started, not handed out), starting, "
                                                "and its target."), ("preset", "state")),
    "arservice_warm_pool_handouts_total": ("counter", "Starts a warm pool answered with a ready instance.", ("preset",)),
    "arservice_agent_requests_in_flight": ("gauge", "Requests forwarded to agents and not answered yet.", ("request",)),
    "arservice_slurm_jobs": ("gauge", "Agent jobs of the Slurm runner, by state.", ("state",)),
    "arservice_slurm_jobs_submitted_total": ("counter", "Jobs the Slurm runner submitted.", ()),
    "arservice_slurm_jobs_lost_total": ("counter", "Jobs that ended without the runner asking.", ()),
    "arservice_slurm_jobs_released_total": ("counter", "Idle jobs the runner released.", ()),
    "arservice_broker_loop_lag_seconds": ("histogram", ("How late the broker loop's 100 ms tick ran: time it "
                                                                "spent on messages, or without the CPU."), ()),
}
HISTOGRAM_BUCKETS = {
    "arservice_instance_start_duration_seconds": START_BUCKETS_S,
    "arservice_command_duration_seconds": COMMAND_BUCKETS_S,
    "arservice_broker_loop_lag_seconds": LOOP_LAG_BUCKETS_S,
}


class Histogram:
    """Per label tuple: a count for each bucket (the last one is +Inf), then the sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        counts[bisect.bisect_left(self.bounds, value)] += 1
        counts[-1] += value


class BrokerMetrics:
    """Counters, histograms and recent errors of one broker; read the rest from the broker when asked."""

    def __init__(self, broker: "Broker") -> None:
        self.broker = broker
        self.counters: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
        self.histograms = {name: Histogram(bounds) for name, bounds in HISTOGRAM_BUCKETS.items()}
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ERRORS)
        self.last_loop_lag_s = 0.0

    def _count(self, name: str, labels: tuple = ()) -> None:
        series = self.counters[name]
        series[labels] = series.get(labels, 0) + 1

    # -- hooks the broker calls ---------------------------------------------------

    def answered(self, pending: Pending, msg: dict[str, Any]) -> None:
        """An agent's answer (or a timeout, or agent_lost) to a forwarded request is going out."""
        ok = msg["type"] == protocol.REPLY
        env_type = pending.env_type
        if ok:
            result = msg.get("result")
            timed_out = pending.kind == protocol.EXECUTE and isinstance(result, dict) and result.get("timed_out") is True
            outcome = "timed_out" if timed_out else "ok"
        else:
            outcome = msg["error"]["code"]
            self.error(pending.kind, outcome, msg["error"]["message"], pending.instance_id, pending.agent_id)
        counter = ANSWER_COUNTERS[pending.kind]
        self._count(counter, (pending.kind, env_type, outcome) if counter in PER_REQUEST
                    else (env_type, outcome))
        now = time.monotonic()
        if pending.kind in LATENCY_HISTOGRAMS:
            self.histograms[LATENCY_HISTOGRAMS[pending.kind]].observe((env_type,), now - pending.sent)
        if pending.kind == protocol.EXECUTE:
            inst = self.broker.pool.instances.get(pending.instance_id)
            if inst is not None:
                inst.last_command = time.time()
                inst.commands += 1

    def error(self, request: object, code: str, message: str, instance_id: object = None,
              agent_id: str | None = None) -> None:
        """An error answer is going out (to a client, or to an agent the broker refuses)."""
        # Only the broker's own message types become labels: a peer inventing types must not grow the series.
        request = request if request in self.broker.handlers or request in self.broker.requests else "unknown"
        self._count("arservice_errors_total", (request, code))
        self.errors.appendleft({
            "time": time.time(), "request": request, "code": code, "message": str(message)[:ERROR_MESSAGE_CHARS],
            "instance_id": instance_id if isinstance(instance_id, str) else None, "agent_id": agent_id,
        })

    def agent_registered(self) -> None:
        self._count("arservice_agents_registered_total")

    def agent_lost(self, agent: Agent) -> None:
        self._count("arservice_agents_lost_total", ("true" if agent.draining else "false",))

    def instance_expired(self, reason: str) -> None:
        self._count("arservice_instances_expired_total", (reason,))

    def agent_unreachable(self) -> None:
        self._count("arservice_agents_unreachable_total")

    def loop_lag(self, seconds: float) -> None:
        self.last_loop_lag_s = seconds
        self.histograms["arservice_broker_loop_lag_seconds"].observe((), seconds)

    # -- snapshots ----------------------------------------------------------------

    def families(self) -> list[list[Any]]:
        """Every metric as [name, type, help, label names, samples]; a histogram's samples carry its
        bucket bounds first. Samples are [label values, value] or, for histograms, [label values, counts]."""
        gauges = self._gauges()
        out: list[list[Any]] = []
        for name, (kind, help_text, labels) in FAMILIES.items():
            if kind == "histogram":
                histogram = self.histograms[name]
                samples = [list(histogram.bounds), [[list(k), v] for k, v in histogram.series.items()]]
            else:  # the Slurm and warm pool counters are read from state, like the gauges
                series = gauges[name] if name in gauges else self.counters.get(name, {})
                samples = [[list(k), v] for k, v in series.items()]
            out.append([name, kind, help_text, list(labels), samples])
        return out

    def _gauges(self) -> dict[str, dict[tuple, float]]:
        broker = self.broker
        pool = broker.pool
        gauges: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
        instances = gauges["arservice_instances"]
        for inst in pool.instances.values():
            key = (inst.state.value, inst.config["type"], inst.agent_id)
            instances[key] = instances.get(key, 0) + 1
        agents = gauges["arservice_agents"]
        agents[("active",)] = agents[("draining",)] = 0
        for agent in pool.agents.values():
            agents[("draining" if agent.draining else "active",)] += 1
            for resource in RESOURCES:
                unit, factor = RESOURCE_UNITS[resource]
                if agent.capacity.get(resource) is not None:
                    gauges[f"arservice_agent_capacity_{unit}"][(agent.agent_id,)] = agent.capacity[resource] * factor
                gauges[f"arservice_agent_used_{unit}"][(agent.agent_id,)] = agent.used[resource] * factor
        capacity = pool.capacity()
        for resource in RESOURCES:
            unit, factor = RESOURCE_UNITS[resource]
            if capacity[resource] is not None:
                gauges[f"arservice_pool_capacity_{unit}"][()] = capacity[resource] * factor
            gauges[f"arservice_pool_used_{unit}"][()] = pool.used[resource] * factor
        gauges["arservice_waiting_starts"] = {(t,): n for t, n in waiting_by_type(broker.waiting).items()}
        for preset, pool in broker.warm.describe().items():
            for state in ("ready", "starting", "target"):
                gauges["arservice_warm_pool_instances"][(preset, state)] = pool[state]
            gauges["arservice_warm_pool_handouts_total"][(preset,)] = pool["handed_out"]
        in_flight = gauges["arservice_agent_requests_in_flight"]
        for pending in broker.pending.values():
            in_flight[(pending.kind,)] = in_flight.get((pending.kind,), 0) + 1
        runner = broker.runner_status or {}
        if runner.get("runner") == "slurm":  # a report is a client's message: take only the numbers from it
            jobs: dict[Any, Any] = runner["jobs"] if isinstance(runner.get("jobs"), dict) else {}
            gauges["arservice_slurm_jobs"] = {(str(state),): n for state, n in jobs.items() if _number(n)}
            for what in ("submitted", "lost", "released"):
                if _number(runner.get(what)):
                    gauges[f"arservice_slurm_jobs_{what}_total"] = {(): runner[what]}
        return gauges

    def status(self) -> dict[str, Any]:
        """What the status page and `arservice status` show: GET /get_available_resources, every
        instance, the runner's report and the recent errors."""
        broker = self.broker
        now = time.monotonic()
        result = broker.pool.describe(now)
        result["instances_by_state"] = result.pop("instances")
        result["instances"] = [inst.describe() for inst in broker.pool.instances.values()]
        result["waiting"] = {"starts": len(broker.waiting), "by_type": waiting_by_type(broker.waiting)}
        result["runner"] = broker.runner_status
        result["errors"] = list(self.errors)
        result["loop_lag_s"] = self.last_loop_lag_s
        result["time"] = time.time()
        return result


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def waiting_by_type(waiting: list[WaitingStart]) -> dict[str, int]:
    by_type: dict[str, int] = {}
    for start in waiting:
        by_type[start.config["type"]] = by_type.get(start.config["type"], 0) + 1
    return by_type

