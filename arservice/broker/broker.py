"""The broker: one thread, one ROUTER socket, one handler per message type.

Agents and clients share the ROUTER (bound on TCP, and on inproc for the HTTP front end);
the message type tells them apart. The loop never blocks on anything but the poller:
commands, environment starts and everything slow happen on agents.
"""

import itertools
import secrets
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq

from .. import curve, environments, protocol, schemas
from ..environments.session import INTERRUPT_GRACE_S
from ..logs import EventLog
from ..protocol import MAX_MESSAGE_BYTES, Message, ServiceError
from .metrics import BrokerMetrics, waiting_by_type
from .pools import WarmPools
from .state import (
    ENDED_STATES,
    Agent,
    Instance,
    Pending,
    Pool,
    Snapshot,
    State,
    WaitingStart,
    cost_of,
    to_units,
)

log = EventLog("broker")
# A peer's ROUTER envelope: its identity (and a REQ socket's empty delimiter).
Envelope = list[bytes]
# A large reply as it came: its frame and where its fields lie (protocol.skim).
Skimmed = tuple[bytes, list[tuple[str, int, int]]]


def stream_field(stream: bool) -> dict[str, bool]:
    """`stream: true` asks for the output as chunk messages before the answer."""
    return {"stream": True} if stream else {}


INPROC_ADDRESS = "inproc://arservice-broker"
# An agent answers after the command's own time limit; allow it this much more.
ANSWER_GRACE_S = 10.0
REQUEST_TIMEOUT_S = 60.0
LOST_INSTANCE_KEEP_S = 3600.0
TICK_S = 0.1
# Frames queued per peer before libzmq stops reading from it (TCP pushes back on the sender).
RECEIVE_QUEUE = 1000
AGENT_TYPES = (protocol.HEARTBEAT, protocol.DISCONNECT, protocol.REPLY, protocol.ERROR)
# A reply this large passes on to its client without being decoded (protocol.skim, readdressed):
# one copy of its output in the broker, not four. Smaller ones are decoded, which costs less there.
PASS_ON_BYTES = 256 << 10
# The requests whose answer the broker reads whole (the others' results pass on as they are).
READS_RESULT = (protocol.START_INSTANCE, protocol.FORK_INSTANCE, protocol.SNAPSHOT_INSTANCE, protocol.CLOSE_INSTANCE)


class Broker:
    def __init__(self, bind: str, *, context: zmq.Context | None = None, limits: dict[str, Any] | None = None,
                 presets: dict[str, dict[str, Any]] | None = None, token: str | None = None,
                 agent_secret: str | None = None, heartbeat_s: float = 1.0, agent_timeout_s: float = 5.0,
                 agent_grace_s: float = 60.0, start_wait_s: float = 0.0, instance_ttl_s: float | None = None,
                 idle_timeout_s: float | None = None, rejoin_s: float = 0.0,
                 pools: dict[str, Any] | None = None) -> None:
        self.ctx = context or zmq.Context.instance()
        self.pool = Pool(limits or {})
        self.presets = presets or {}
        unknown = sorted(set(pools or {}) - set(self.presets))
        if unknown:
            raise ValueError(f"warm pools of unknown presets: {', '.join(unknown)}")
        self.warm = WarmPools(pools or {}, self.pool.instances)
        # Parsed once: refills run on the loop's tick.
        self.pool_configs = {name: environments.backend(self.presets[name].get("type")).parse_config(self.presets[name])
                             for name in self.warm.pools}
        self.snapshots: dict[str, Snapshot] = {}
        self.token = token
        # What an agent must present to register: the token, or a secret its runner gave it.
        self.agent_secret = agent_secret or token
        self.heartbeat_s = heartbeat_s
        # Silent this long: the agent's instances are unreachable; silent for the grace more: lost.
        self.agent_timeout_s = agent_timeout_s
        self.agent_grace_s = agent_grace_s
        # The lease of an instance whose spec sets none (None: no limit).
        self.instance_ttl_s = instance_ttl_s
        self.idle_timeout_s = idle_timeout_s
        self.pending: dict[Any, Pending] = {}  # by broker request id (a str; looked up by what agents send)
        # How long a start may wait for an agent with room (a runner may be starting one); 0: refuse at once.
        self.start_wait_s = start_wait_s
        self.waiting: list[WaitingStart] = []  # oldest first
        self.runner_status: dict[str, Any] | None = None  # what the runner last reported, shown in resources
        self.lost_agents: set[str] = set()  # agent ids this broker declared lost: it adopts nothing from them
        # Where agents outlive a broker (rejoin_s: --agent-timeout + --agent-grace, as long as the old
        # broker would have waited for a silent agent), an id this broker never knew may, for that long
        # after its start, be one an agent has not brought back yet: requests on it are `unavailable`
        # (clients send them again), `not_found` only after; and an agent back later adopts nothing, as
        # the old broker would have declared it lost. 0 where no agent can outlive it.
        self.rejoin_until = time.monotonic() + rejoin_s
        self.known_ids: set[str] = set()  # ids this broker started or adopted within that window
        self.metrics = BrokerMetrics(self)
        self._ids = itertools.count(1)
        self._stopping = False
        self._next_heartbeat = 0.0
        # With a token, TCP peers must pass a CURVE handshake (checked by `zap`) before any frame is read.
        self.zap = curve.ZapHandler(self.ctx, token) if token else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        if token:
            curve.secure_server(self.sock, token)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # With a token, a frame past MAX_FRAME_BYTES ends its connection (larger messages come split): a
        # peer failing the handshake costs that much at most. Without one, every peer may send anyway.
        frame_limit = protocol.MAX_FRAME_BYTES + curve.FRAME_OVERHEAD_BYTES if token else MAX_MESSAGE_BYTES
        self.sock.setsockopt(zmq.MAXMSGSIZE, frame_limit)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock.bind(INPROC_ADDRESS)
        # Messages of agents (and answers), each with its handler.
        self.handlers: dict[str, Callable[[Envelope, Message], None]] = {
            protocol.REGISTER: self.on_register,
            protocol.HEARTBEAT: self.on_heartbeat,
            protocol.DISCONNECT: self.on_disconnect,
            protocol.REPLY: self.on_agent_answer,
            protocol.ERROR: self.on_agent_answer,
            protocol.CHUNK: self.on_agent_chunk,
        }
        # Client requests (schemas.REQUESTS has each one's model), each with its handler: it gets
        # the request's id and its validated fields.
        self.requests: dict[str, Callable[[Envelope, Any, Any], None]] = {
            protocol.START_INSTANCE: self.on_start_instance,
            protocol.EXECUTE: self.on_execute,
            protocol.CLOSE_INSTANCE: self.on_close_instance,
            protocol.WRITE_FILE: self.on_write_file,
            protocol.READ_FILE: self.on_read_file,
            protocol.RESOURCES: self.on_resources,
            protocol.INSTANCES: self.on_instances,
            protocol.PING: self.on_ping,
            protocol.RENEW: self.on_renew,
            protocol.FORK_INSTANCE: self.on_fork_instance,
            protocol.SNAPSHOT_INSTANCE: self.on_snapshot_instance,
            protocol.DELETE_SNAPSHOT: self.on_delete_snapshot,
            protocol.RUNNER_STATUS: self.on_runner_status,
            protocol.RELEASE_AGENT: self.on_release_agent,
            protocol.METRICS: self.on_metrics,
            protocol.STATUS: self.on_status,
            protocol.CREATE_SESSION: self.on_create_session,
            protocol.RUN_IN_SESSION: self.on_run_in_session,
            protocol.CLOSE_SESSION: self.on_close_session,
        }

    def stop(self) -> None:
        """Ask the loop to end within one tick; safe from any thread."""
        self._stopping = True

    def run(self) -> None:
        log.info("broker_started", address=self.address, limits=self.pool.limits)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.sock, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._stopping:
                ready = dict(poller.poll(timeout=max(0.0, next_tick - time.monotonic()) * 1000))  # type: ignore[arg-type]  # pyzmq takes float ms
                if self.zap is not None and self.zap.sock in ready:
                    self.zap.answer()
                if self.sock in ready:
                    self._drain()
                now = time.monotonic()
                if now >= next_tick:
                    self.metrics.loop_lag(now - next_tick)
                    self.tick(now)
                    next_tick = now + TICK_S
        finally:
            self.sock.close()
            if self.zap is not None:
                self.zap.close()
            log.info("broker_stopped")

    def _drain(self) -> None:
        while True:
            try:
                envelope, frames = protocol.unwrap(self.sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.handle(envelope, frames)

    def handle(self, envelope: Envelope, frames: list[bytes]) -> None:
        msg_id = None
        msg: Message = {}
        try:
            payload = protocol.joined(frames)
            head = protocol.peek(payload)
            msg_id = head.get("id")
            self._admit(envelope, head)
            if head["type"] == protocol.REPLY and len(payload) >= PASS_ON_BYTES:
                msg, spans = protocol.skim(payload)
                self.on_agent_answer(envelope, msg, (payload, spans))
                return
            msg = protocol.decode(payload)
            del payload
            frames.clear()  # (the caller's list too) a large write_file is then held once, as decoded
            kind = msg["type"]
            if kind in self.requests:
                self.requests[kind](envelope, msg["id"], schemas.request_of(msg))
            else:
                self.handlers[kind](envelope, msg)
        except ServiceError as exc:
            self.metrics.error(msg.get("type"), exc.code, exc.message, msg.get("instance_id"))
            self.send(envelope, protocol.error(msg_id, exc.code, exc.message))
        except Exception as exc:  # a bug must cost one request, never the broker
            log.error("handler_failed", error=repr(exc), trace=traceback.format_exc().replace("\n", " | "))
            self.metrics.error(msg.get("type"), "internal", repr(exc), msg.get("instance_id"))
            self.send(envelope, protocol.error(msg_id, "internal", f"internal error: {exc!r}"))

    def send(self, envelope: Sequence[bytes], msg: Message | bytes) -> bool:
        """Send a message (or its encoded frame) to a peer; False if it is gone (its messages are then dropped)."""
        try:
            # copy=False: libzmq sends from the frame's own bytes (pyzmq copies small ones anyway).
            self.sock.send_multipart([*envelope, protocol.encode(msg) if isinstance(msg, dict) else msg], copy=False)
            return True
        except zmq.ZMQError as exc:
            log.debug("peer_unreachable", peer=envelope[0].hex() if envelope else "", error=exc.strerror)
            return False

    def _admit(self, envelope: Envelope, head: Message) -> None:
        """Refuse a frame whose sender may not send it, from its envelope alone (before it is parsed)."""
        kind = head["type"]
        if kind not in self.handlers and kind not in self.requests:
            raise ServiceError("invalid_request", f"unknown message type {kind!r}")
        if kind in self.requests:
            if self.token and not protocol.same_secret(head.get("token"), self.token):
                raise ServiceError("unauthorized", "missing or wrong token")
            if "id" not in head:
                raise ServiceError("invalid_request", "missing required field 'id'")
        elif kind == protocol.REGISTER:
            if self.agent_secret and not protocol.same_secret(head.get("secret"), self.agent_secret):
                log.warning("agent_refused", reason="wrong secret")
                raise ServiceError("unauthorized", "wrong agent secret")
        elif not envelope or envelope[0] not in self.pool.agents:
            raise ServiceError("not_registered", "this agent is not registered (lost or unknown); register again")

    # -- time ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        beat = now >= self._next_heartbeat
        if beat:
            self._next_heartbeat = now + self.heartbeat_s
        for identity, agent in list(self.pool.agents.items()):
            silent = now - agent.last_seen
            if silent > self.agent_timeout_s + self.agent_grace_s:
                self._lose_agent(agent, f"no heartbeat for {silent:.1f}s")
            elif beat and not self.send([identity], protocol.request(protocol.HEARTBEAT, None)):
                # Its connection is gone (ROUTER_MANDATORY): the process died or closed the socket.
                # A stopped process keeps its connection, and only falls silent.
                self._lose_agent(agent, "disconnected")
            elif silent > self.agent_timeout_s and agent.unreachable_since is None:
                self._agent_unreachable(agent, now)
        for request_id, pending in list(self.pending.items()):
            if now >= pending.deadline:
                del self.pending[request_id]
                self._expire(pending)
        if self.waiting:
            self._place_waiting(now)
        elif self.warm.pools:  # pools take only room that no start waits for
            self._refill(now)
        if beat:
            self._end_leases(now)

    def _end_leases(self, now: float) -> None:
        """Close the instances whose lease ended; forget ended ones after a while."""
        wall = time.time()
        busy = None
        for inst in list(self.pool.instances.values()):
            if inst.state in ENDED_STATES:
                if wall - cast(float, inst.ended_at) > LOST_INSTANCE_KEEP_S:  # set as it ended
                    del self.pool.instances[inst.instance_id]
                continue
            why = inst.state == State.RUNNING and inst.lease_over(now)
            if not why:
                continue
            if busy is None:  # a command in flight is use, however long it runs
                busy = {p.instance_id for p in self.pending.values()}
            if why == "idle" and inst.instance_id in busy:
                continue
            inst.ended(State.EXPIRED, wall)
            self.metrics.instance_expired(why)
            log.warning("instance_expired", instance=inst.instance_id, agent=inst.agent_id, reason=why)
            self._forward(self._agent_of(inst.agent_id), inst, protocol.CLOSE_INSTANCE, {}, None, None,
                          REQUEST_TIMEOUT_S)

    def _expire(self, pending: Pending) -> None:
        inst = self.pool.instances.get(pending.instance_id)
        what = f"{pending.kind} on instance {pending.instance_id}"
        log.warning("request_timed_out", kind=pending.kind, instance=pending.instance_id, agent=pending.agent_id)
        for fork_id in pending.forks:  # the agent may still make them: make sure they go away
            fork = self.pool.instances.get(fork_id)
            agent = self.pool.agent_by_id(pending.agent_id)
            if fork is not None and fork.state == State.STARTING:
                self.pool.release(fork)
                if agent is not None:
                    self._forward(agent, fork, protocol.CLOSE_INSTANCE, {}, None, None, REQUEST_TIMEOUT_S)
        if inst is not None and pending.kind in (protocol.START_INSTANCE, protocol.CLOSE_INSTANCE):
            self.pool.release(inst)
            agent = self.pool.agent_by_id(inst.agent_id)
            if agent is not None and pending.kind == protocol.START_INSTANCE:
                # The agent may still finish the start; make sure that instance goes away.
                self._forward(agent, inst, protocol.CLOSE_INSTANCE, {}, None, None, REQUEST_TIMEOUT_S)
        self._answer_client(pending, protocol.error(pending.client_id, "timeout", f"agent {pending.agent_id} did not answer {what} in time"))

    def _answer_client(self, pending: Pending, msg: Message, received: Skimmed | None = None) -> None:
        """Send an answer to the client that waits for it; `received`: msg is skimmed, and these
        are the bytes it came as (passed on with the client's id)."""
        if pending.envelope is not None:  # first: whatever goes wrong after, the client has its answer
            self.send(pending.envelope, {**msg, "id": pending.client_id} if received is None
                      else protocol.readdressed(*received, pending.client_id))
        self.metrics.answered(pending, msg)

    # -- agents -------------------------------------------------------------------

    def on_register(self, envelope: Envelope, msg: Message) -> None:
        identity = envelope[0]
        reg = schemas.fields_of(msg, schemas.Register)
        agent_id = reg.agent_id
        if agent_id.encode() != identity:
            raise ServiceError("invalid_request", "agent_id must be the agent socket's identity")
        capacity = reg.capacity.model_dump()
        env_types = reg.env_types
        old = self.pool.agents.get(identity)
        if old is not None:
            self._lose_agent(old, "registered again")
        held = reg.instances
        now = time.monotonic()
        agent = self.pool.agents[identity] = Agent(identity, agent_id, to_units(capacity), env_types, reg.hostname,
                                                   reg.pid, reg.slurm_job_id, now)
        drop = [self._adopt(agent, item) for item in held]
        drop = [instance_id for instance_id in drop if instance_id]
        for item in reg.snapshots:  # what it kept through a broker restart
            if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] not in self.snapshots:
                self.snapshots[item["name"]] = Snapshot(item["name"], agent_id, str(item.get("type")),
                                                        str(item.get("source")), ready=True)
        self.metrics.agent_registered()
        log.info("agent_registered", agent=agent_id, capacity=capacity, types=",".join(map(str, env_types)),
                 slurm_job=reg.slurm_job_id, adopted=len(held) - len(drop), dropped=len(drop))
        self.send(envelope, protocol.reply(msg.get("id"), {"registered": True, "heartbeat_s": self.heartbeat_s,
                                                           "drop": drop}))
        if self.waiting:
            self._place_waiting(now)

    def _adopt(self, agent: Agent, item: Any) -> str | None:
        """Take on an instance an agent held through a broker restart, with its id, spec and info;
        return its id if the agent must close it instead (this broker ended it, or cannot read it)."""
        instance_id = item.get("instance_id") if isinstance(item, dict) else None
        if not isinstance(instance_id, str):
            return None
        if instance_id in self.pool.instances or agent.agent_id in self.lost_agents:
            return instance_id  # this broker declared it lost or expired (a client was told so): it stays so
        if not self._rejoining():
            log.warning("adoption_refused", agent=agent.agent_id, instance=instance_id,
                        error="back after the broker's grace: its requests were answered not_found")
            return instance_id
        try:
            held = schemas.validated(schemas.HeldInstance, item)
            config = environments.backend(held.environment.get("type")).parse_config(held.environment)
        except ServiceError as exc:
            log.warning("adoption_refused", agent=agent.agent_id, instance=instance_id, error=exc.message)
            return instance_id
        inst = Instance(instance_id, agent.agent_id, held.environment, config,
                        ttl_s=config["ttl"] or self.instance_ttl_s, idle_s=config["idle_timeout"] or self.idle_timeout_s)
        inst.started()
        inst.info = held.info
        self.pool.admit(inst, agent)
        self._remember(instance_id)
        log.info("instance_adopted", instance=instance_id, agent=agent.agent_id, type=config["type"])
        return None

    def _agent(self, envelope: Envelope) -> Agent:
        agent = self.pool.agents.get(envelope[0]) if envelope else None
        if agent is None:
            raise ServiceError("not_registered", "this agent is not registered (lost or unknown); register again")
        agent.last_seen = time.monotonic()
        if agent.unreachable_since is not None:
            self._agent_back(agent)
        return agent

    def _lose_instance(self, inst: Instance, agent: Agent, reason: str) -> None:
        """The agent found the instance's environment gone (its container ended, dockerd lost it):
        it is lost, its capacity is free, and the agent removes what is left of it."""
        log.warning("instance_lost", instance=inst.instance_id, agent=agent.agent_id, reason=reason)
        inst.ended(State.LOST, time.time())
        self.pool.release(inst)
        self._forward(agent, inst, protocol.CLOSE_INSTANCE, {}, None, None, REQUEST_TIMEOUT_S)

    def _agent_unreachable(self, agent: Agent, now: float) -> None:
        """A silent agent may be stopped or cut off, not dead: its instances wait for it, for the grace."""
        agent.unreachable_since = now
        self.metrics.agent_unreachable()
        log.warning("agent_unreachable", agent=agent.agent_id, silent_s=round(now - agent.last_seen, 1),
                    grace_s=self.agent_grace_s, instances=len(agent.instance_ids))
        for instance_id in agent.instance_ids:
            self.pool.instances[instance_id].agent_silent()

    def _agent_back(self, agent: Agent) -> None:
        log.info("agent_back", agent=agent.agent_id, after_s=round(agent.last_seen - cast(float, agent.unreachable_since), 1))
        agent.unreachable_since = None
        for instance_id in agent.instance_ids:
            self.pool.instances[instance_id].agent_back(agent.last_seen)

    def on_heartbeat(self, envelope: Envelope, msg: Message) -> None:
        self._agent(envelope)

    def on_disconnect(self, envelope: Envelope, msg: Message) -> None:
        agent = self.pool.agents.get(envelope[0])
        if agent is not None:
            self._lose_agent(agent, "disconnected")

    def _lose_agent(self, agent: Agent, reason: str) -> None:
        """Forget an agent: its instances become lost and its capacity leaves the pool."""
        # A released (draining) agent going away is what its runner asked for.
        (log.info if agent.draining else log.warning)("agent_lost", agent=agent.agent_id, reason=reason,
                                                      instances=len(agent.instance_ids))
        self.pool.drop_agent(agent)
        self.lost_agents.add(agent.agent_id)
        for name in [n for n, s in self.snapshots.items() if s.agent_id == agent.agent_id]:
            del self.snapshots[name]  # its files went with it
        self.metrics.agent_lost(agent)
        for request_id, pending in list(self.pending.items()):
            if pending.agent_id == agent.agent_id:
                del self.pending[request_id]
                self._answer_client(pending, protocol.error(None, "agent_lost", f"agent {agent.agent_id} was lost: {reason}"))

    def on_agent_answer(self, envelope: Envelope, msg: Message, received: Skimmed | None = None) -> None:
        """An agent's answer to a request it was sent. `received`: msg is skimmed (its large values
        are None), and these are the bytes it came as."""
        agent = self._agent(envelope)
        pending = self.pending.get(msg.get("id"))
        if received is not None and pending is not None and pending.kind in READS_RESULT:
            msg, received = protocol.decode(received[0]), None
        if pending is None or pending.agent_id != agent.agent_id:
            self._close_unclaimed_start(agent, msg)  # or the answer to a request that already timed out
            return
        del self.pending[msg["id"]]
        inst = self.pool.instances.get(pending.instance_id)
        ok = msg["type"] == protocol.REPLY
        result: Any = msg.get("result") if ok else None
        if ok and not isinstance(result, dict):  # a broken agent's answer fails its request, not the broker
            ok, result = False, None
            msg = protocol.error(None, "environment_error", f"agent {agent.agent_id} answered {pending.kind} without a result map")
        if pending.kind == protocol.START_INSTANCE and inst is not None:
            if ok:
                inst.started()
                inst.info = result.get("info") or {}
                result = self._started(inst)
                log.info("instance_started", instance=inst.instance_id, agent=inst.agent_id, type=inst.config["type"],
                         **({"pool": inst.pooled_for} if inst.pooled_for else {}))
            else:
                self.pool.release(inst)
                log.warning("instance_start_failed", instance=inst.instance_id, error=msg.get("error"))
            self.warm.started(inst, ok, time.monotonic())
        elif pending.kind == protocol.FORK_INSTANCE:
            result = self._forked(pending, result if ok else None)
        elif pending.kind == protocol.SNAPSHOT_INSTANCE:
            result = self._snapshotted(pending, result if ok else None)
        elif pending.kind == protocol.CLOSE_INSTANCE and inst is not None:
            self.pool.release(inst)
            result = {"instance_id": inst.instance_id, "closed": True}
            log.info("instance_closed", instance=inst.instance_id, agent=inst.agent_id)
        if ok:
            self._answer_client(pending, protocol.reply(None, result), received)
        else:
            error = msg.get("error") or {}
            code = error["code"] if error.get("code") in protocol.ERROR_CODES else "environment_error"
            if code == "instance_lost" and inst is not None and inst.state == State.RUNNING:
                self._lose_instance(inst, agent, str(error.get("message", "")))
            self._answer_client(pending, protocol.error(None, code, str(error.get("message", ""))))

    def _forked(self, pending: Pending, result: dict[str, Any] | None) -> dict[str, Any] | None:
        """A fork's answer: its instances run with the info the agent gave each, or (result None) go."""
        infos = {}
        if result is not None:
            infos = {item.get("instance_id"): item.get("info") for item in result.get("instances") or []
                     if isinstance(item, dict)}
        forks = [f for f in map(self.pool.instances.get, pending.forks) if f is not None and f.state == State.STARTING]
        for fork in forks:
            if result is None:
                self.pool.release(fork)
                continue
            fork.started()
            fork.info = infos.get(fork.instance_id) or {}
            log.info("instance_forked", instance=fork.instance_id, source=pending.instance_id, agent=fork.agent_id)
        return None if result is None else {"source": pending.instance_id, "instances": [self._started(f) for f in forks]}

    def _snapshotted(self, pending: Pending, result: dict[str, Any] | None) -> dict[str, Any] | None:
        """A snapshot's answer: it is ready, or (result None) its name is free again."""
        name = pending.forks[0]
        snapshot = self.snapshots.get(name)
        if snapshot is None or snapshot.ready:
            return result
        if result is None:
            del self.snapshots[name]
            return None
        snapshot.ready = True
        log.info("snapshot_made", name=name, source=pending.instance_id, agent=pending.agent_id)
        return {"name": name, **snapshot.describe()}

    @staticmethod
    def _started(inst: Instance) -> dict[str, Any]:
        """What a client is told of an instance that started for it."""
        return {"instance_id": inst.instance_id, "agent_id": inst.agent_id, "environment": inst.spec, "info": inst.info}

    def _close_unclaimed_start(self, agent: Agent, msg: Message) -> None:
        """A start's answer that no request here waits for, naming an instance this broker does not
        hold: the start was sent by a broker gone since, so no client has the id. The agent closes
        it, rather than hold it unknown to every broker for as long as it lives."""
        result = msg.get("result") if msg["type"] == protocol.REPLY else None
        instance_id = result.get("instance_id") if isinstance(result, dict) and "info" in result else None
        if isinstance(instance_id, str) and instance_id not in self.pool.instances:
            log.warning("unclaimed_start_closed", instance=instance_id, agent=agent.agent_id)
            self.send([agent.identity], protocol.request(protocol.CLOSE_INSTANCE, f"b{next(self._ids)}",
                                                         instance_id=instance_id))

    def on_agent_chunk(self, envelope: Envelope, msg: Message) -> None:
        """Output of a streamed command, passed on to its client as it comes (the answer stays pending)."""
        agent = self._agent(envelope)
        pending = self.pending.get(msg.get("id"))
        if pending is None or pending.agent_id != agent.agent_id or pending.envelope is None:
            return
        data = msg.get("data")
        if isinstance(data, bytes):
            self.send(pending.envelope, {"v": protocol.VERSION, "type": protocol.CHUNK, "id": pending.client_id,
                                         "data": data})

    # -- clients ------------------------------------------------------------------

    def on_ping(self, envelope: Envelope, msg_id: Any, req: schemas.Ping) -> None:
        self.send(envelope, protocol.reply(msg_id, {"pong": True, "agents": len(self.pool.agents)}))

    def on_resources(self, envelope: Envelope, msg_id: Any, req: schemas.Resources) -> None:
        result = self.pool.describe(time.monotonic())
        result["waiting"] = {"starts": len(self.waiting), "by_type": waiting_by_type(self.waiting)}
        if self.warm.pools:
            result["pools"] = self.warm.describe()
        if self.snapshots:
            result["snapshots"] = {name: snapshot.describe() for name, snapshot in self.snapshots.items()}
        if self.runner_status is not None:
            result["runner"] = self.runner_status
        self.send(envelope, protocol.reply(msg_id, result))

    def on_metrics(self, envelope: Envelope, msg_id: Any, req: schemas.Metrics) -> None:
        self.send(envelope, protocol.reply(msg_id, {"families": self.metrics.families()}))

    def on_status(self, envelope: Envelope, msg_id: Any, req: schemas.Status) -> None:
        self.send(envelope, protocol.reply(msg_id, self.metrics.status()))

    def on_runner_status(self, envelope: Envelope, msg_id: Any, req: schemas.RunnerStatus) -> None:
        self.runner_status = req.status
        self.send(envelope, protocol.reply(msg_id, {}))

    def on_release_agent(self, envelope: Envelope, msg_id: Any, req: schemas.ReleaseAgent) -> None:
        """A runner wants to stop an agent: allowed only while it holds nothing; it then takes nothing new.
        With drain (its job nears its end) it takes nothing new even while it still holds instances."""
        agent_id = req.agent_id
        agent = self.pool.agent_by_id(agent_id)
        if agent is None:
            raise ServiceError("not_found", f"no agent {agent_id!r}")
        busy = len(agent.instance_ids) + sum(p.agent_id == agent_id for p in self.pending.values())
        if busy and not req.drain:
            raise ServiceError("conflict", f"agent {agent_id} is busy ({busy} instances or requests)")
        agent.draining = True
        log.info("agent_released", agent=agent_id)
        self.send(envelope, protocol.reply(msg_id, {"agent_id": agent_id, "released": True}))

    def on_instances(self, envelope: Envelope, msg_id: Any, req: schemas.Instances) -> None:
        """The instances that match every filter given (env_type: the message's own `type` is taken), in
        instance id order, from after the cursor on.

        Ids are the stable order, so the last id of a page is the cursor for the next one (`next`,
        null on the last page) even while instances come and go between pages."""
        matching = sorted(
            (i for i in self.pool.instances.values()
             if i.instance_id > req.after
             and (req.state is None or i.state == req.state)
             and (req.agent_id is None or i.agent_id == req.agent_id)
             and (req.env_type is None or i.config["type"] == req.env_type)),
            key=lambda i: i.instance_id)
        page = matching if req.limit is None else matching[:req.limit]
        more = len(page) < len(matching)
        self.send(envelope, protocol.reply(msg_id, {"instances": [i.describe() for i in page],
                                                       "next": page[-1].instance_id if more else None}))

    def on_renew(self, envelope: Envelope, msg_id: Any, req: schemas.Renew) -> None:
        """Keep an instance: its idle clock starts again; a ttl gives it that many seconds from now."""
        inst = self._instance(req.instance_id)
        self._check_usable(inst, (State.RUNNING, State.STARTING, State.UNREACHABLE))
        now = time.monotonic()
        inst.last_used = now
        if req.ttl is not None:
            inst.expires_at = now + req.ttl
        self.send(envelope, protocol.reply(msg_id, {"instance_id": inst.instance_id, **inst.lease(now)}))

    def on_start_instance(self, envelope: Envelope, msg_id: Any, req: schemas.StartInstance) -> None:
        spec = req.environment
        preset = None
        if isinstance(spec, str):
            if spec not in self.presets:
                raise ServiceError("not_found", f"no environment preset named {spec!r}; known: {', '.join(sorted(self.presets)) or 'none'}")
            preset, spec = spec, self.presets[spec]
        config = environments.backend(spec.get("type")).parse_config(spec)
        wait_s = self.start_wait_s if req.wait_s is None else req.wait_s
        pooled = self.warm.take(preset) if preset else None
        if pooled is not None:
            self._hand_out(pooled, envelope, msg_id)
            return
        # First come, first served: while starts of this type wait, a new one queues behind them.
        queued = any(w.config["type"] == config["type"] for w in self.waiting)
        try:
            if queued and wait_s:
                raise ServiceError("no_capacity", f"starts of type {config['type']!r} are waiting for room")
            agent = self._place(config, sparing=preset)
        except ServiceError as exc:
            if not wait_s:
                raise
            self.waiting.append(WaitingStart(envelope, msg_id, spec, config, wait_s))
            log.info("start_waiting", type=config["type"], waiting=len(self.waiting), reason=exc.message)
            return
        self._start_on(agent, spec, config, envelope, msg_id)

    def _start_on(self, agent: Agent, spec: dict[str, Any], config: dict[str, Any], envelope: Envelope | None,
                  client_id: object, pooled_for: str | None = None) -> Instance:
        inst = Instance(f"i-{secrets.token_hex(6)}", agent.agent_id, spec, config,
                        ttl_s=config["ttl"] or self.instance_ttl_s, idle_s=config["idle_timeout"] or self.idle_timeout_s,
                        pooled_for=pooled_for)
        self.pool.admit(inst, agent)
        self._remember(inst.instance_id)
        self._forward(agent, inst, protocol.START_INSTANCE, {"environment": spec}, envelope, client_id, config["start_timeout"])
        return inst

    def _place(self, config: dict[str, Any], sparing: str | None = None, evict: bool = True) -> Agent:
        """The agent for a new instance. Where there is no room, warm pools give up ready instances
        (not of `sparing`, the preset asked for) as long as that may make some, if `evict`."""
        cost = cost_of(config)

        def make_room(may_go: Callable[[Instance], bool]) -> bool:
            return evict and self._evict(self.warm.victim(sparing, may_go))

        while True:
            try:
                self.pool.check_limits(cost)
                break
            except ServiceError:
                if not make_room(lambda inst: True):
                    raise
        if config["snapshot"] is not None:  # where its files are, or nowhere
            agent = self._snapshot_agent(config)
            while short := agent.shortfall(cost):
                if not make_room(lambda inst: inst.agent_id == agent.agent_id):
                    raise ServiceError("no_capacity", f"agent {agent.agent_id}, which holds snapshot "
                                                       f"{config['snapshot']!r}, is out of {short}")
            return agent
        able = {a.agent_id for a in self.pool.agents.values() if config["type"] in a.env_types}
        while True:
            try:
                return self.pool.place(config["type"], cost)
            except ServiceError:
                if not make_room(lambda inst: inst.agent_id in able):
                    raise

    def _evict(self, inst: Instance | None) -> bool:
        """Close a warm pool's ready instance to make room for a client's; False if there is none.
        Its room is free at once: its agent closes it meanwhile."""
        if inst is None:
            return False
        log.info("pooled_instance_evicted", instance=inst.instance_id, agent=inst.agent_id, pool=inst.pooled_for)
        inst.closing()
        self.pool.release(inst)
        self._forward(self._agent_of(inst.agent_id), inst, protocol.CLOSE_INSTANCE, {}, None, None,
                      REQUEST_TIMEOUT_S)
        return True

    def _hand_out(self, inst: Instance, envelope: Envelope, client_id: object) -> None:
        """A warm pool's instance becomes a client's: its lease starts now."""
        log.info("instance_handed_out", instance=inst.instance_id, agent=inst.agent_id, pool=inst.pooled_for)
        inst.handed_out(inst.config["ttl"] or self.instance_ttl_s, inst.config["idle_timeout"] or self.idle_timeout_s)
        self.send(envelope, protocol.reply(client_id, self._started(inst)))

    def _refill(self, now: float) -> None:
        """Start what the warm pools miss, as far as the room nobody waits for allows."""
        for pool in self.warm.to_refill(now):
            spec, config = self.presets[pool.preset], self.pool_configs[pool.preset]
            for _ in range(pool.missing()):
                try:
                    agent = self._place(config, evict=False)
                except ServiceError:
                    break
                pool.starting.add(self._start_on(agent, spec, config, None, None, pooled_for=pool.preset).instance_id)

    def _place_waiting(self, now: float) -> None:
        """Start the waiting starts that fit now, oldest first; refuse the ones that waited too long."""
        still = []
        for waiting in self.waiting:
            try:
                agent = self._place(waiting.config)
            except ServiceError as exc:
                if now < waiting.deadline:
                    still.append(waiting)
                else:
                    message = f"no room within {waiting.wait_s:g}s: {exc.message}"
                    self.metrics.error(protocol.START_INSTANCE, "no_capacity", message)
                    self.send(waiting.envelope, protocol.error(waiting.client_id, "no_capacity", message))
                continue
            log.info("start_placed", type=waiting.config["type"], agent=agent.agent_id)
            self._start_on(agent, waiting.spec, waiting.config, waiting.envelope, waiting.client_id)
        self.waiting = still

    def on_fork_instance(self, envelope: Envelope, msg_id: Any, req: schemas.ForkInstance) -> None:
        """New instances whose files are copies of a running one's, on its agent (where the files are)."""
        source = self._running_instance(req.instance_id)
        count = req.count
        agent = self._agent_of(source.agent_id)
        cost = {name: amount * count for name, amount in source.cost.items()}
        self.pool.check_limits(cost)
        if short := agent.shortfall(cost):
            raise ServiceError("no_capacity", f"agent {agent.agent_id} of instance {source.instance_id} is out of "
                                               f"{short} for {count} fork(s) (forks go where the files are)")
        ttl, idle = source.config["ttl"] or self.instance_ttl_s, source.config["idle_timeout"] or self.idle_timeout_s
        forks = [Instance(f"i-{secrets.token_hex(6)}", agent.agent_id, source.spec, source.config, ttl_s=ttl, idle_s=idle)
                 for _ in range(count)]
        for fork in forks:
            self.pool.admit(fork, agent)
            self._remember(fork.instance_id)
        ids = [f.instance_id for f in forks]
        self._forward(agent, source, protocol.FORK_INSTANCE, {"new_ids": ids}, envelope, msg_id,
                      source.config["start_timeout"], forks=ids)

    def on_snapshot_instance(self, envelope: Envelope, msg_id: Any, req: schemas.SnapshotInstance) -> None:
        """Keep a copy of a running instance's files under a name, on its agent, for later starts."""
        source = self._running_instance(req.instance_id)
        name = req.name
        if name in self.snapshots:
            raise ServiceError("conflict", f"a snapshot named {name!r} exists already")
        if not environments.backend(source.config["type"]).can_fork:
            raise ServiceError("invalid_request", f"{source.config['type']} instances cannot be snapshotted")
        self.snapshots[name] = Snapshot(name, source.agent_id, source.config["type"], source.instance_id)
        self._forward(self._agent_of(source.agent_id), source, protocol.SNAPSHOT_INSTANCE, {"name": name},
                      envelope, msg_id, source.config["start_timeout"], forks=(name,))

    def on_delete_snapshot(self, envelope: Envelope, msg_id: Any, req: schemas.DeleteSnapshot) -> None:
        name = req.name
        snapshot = self.snapshots.get(name)
        if snapshot is None or not snapshot.ready:
            raise ServiceError("not_found", f"no snapshot named {name!r}")
        users = [i.instance_id for i in self.pool.instances.values()
                 if i.config.get("snapshot") == name and i.state not in ENDED_STATES]
        if users:
            raise ServiceError("conflict", f"snapshot {name!r} is in use by {len(users)} instance(s): {', '.join(users[:5])}")
        del self.snapshots[name]
        agent = self._agent_of(snapshot.agent_id)
        # Nobody waits for the agent's answer: the name is gone at once, the files soon.
        self.send([agent.identity], protocol.request(protocol.DELETE_SNAPSHOT, f"b{next(self._ids)}", name=name))
        log.info("snapshot_deleted", name=name, agent=snapshot.agent_id)
        self.send(envelope, protocol.reply(msg_id, {"name": name, "deleted": True}))

    def _snapshot_agent(self, config: dict[str, Any]) -> Agent:
        """The agent that holds the snapshot a spec starts from (starts from it go there)."""
        snapshot = self.snapshots.get(config["snapshot"])
        if snapshot is None or not snapshot.ready:
            raise ServiceError("not_found", f"no snapshot named {config['snapshot']!r}")
        if snapshot.type != config["type"]:
            raise ServiceError("invalid_request", f"snapshot {snapshot.name!r} is of a {snapshot.type} instance, "
                                                   f"not {config['type']}")
        return self._agent_of(snapshot.agent_id)

    def on_execute(self, envelope: Envelope, msg_id: Any, req: schemas.Execute) -> None:
        inst = self._running_instance(req.instance_id)
        timeout = req.timeout or inst.config["timeout"]
        fields = {"command": req.command, "timeout": timeout, "cwd": req.cwd, "env": req.env or {},
                  "output_limit": req.output_limit or inst.config["output_limit"], **stream_field(req.stream)}
        self._forward(self._agent_of(inst.agent_id), inst, protocol.EXECUTE, fields, envelope, msg_id, timeout + ANSWER_GRACE_S)

    def on_create_session(self, envelope: Envelope, msg_id: Any, req: schemas.CreateSession) -> None:
        inst = self._running_instance(req.instance_id)
        fields = {"session": req.session, **({"shell": req.shell} if req.shell else {})}
        self._forward(self._agent_of(inst.agent_id), inst, protocol.CREATE_SESSION, fields, envelope, msg_id,
                      REQUEST_TIMEOUT_S)

    def on_run_in_session(self, envelope: Envelope, msg_id: Any, req: schemas.RunInSession) -> None:
        inst = self._running_instance(req.instance_id)
        timeout = req.timeout or inst.config["timeout"]
        fields = {"session": req.session, "command": req.command, "timeout": timeout,
                  "output_limit": req.output_limit or inst.config["output_limit"], **stream_field(req.stream)}
        # A timed-out command gets its interrupt's grace on the agent, then the answer's.
        self._forward(self._agent_of(inst.agent_id), inst, protocol.RUN_IN_SESSION, fields, envelope, msg_id,
                      timeout + ANSWER_GRACE_S + INTERRUPT_GRACE_S)

    def on_close_session(self, envelope: Envelope, msg_id: Any, req: schemas.CloseSession) -> None:
        inst = self._running_instance(req.instance_id)
        self._forward(self._agent_of(inst.agent_id), inst, protocol.CLOSE_SESSION, {"session": req.session},
                      envelope, msg_id, REQUEST_TIMEOUT_S)

    def on_write_file(self, envelope: Envelope, msg_id: Any, req: schemas.WriteFile) -> None:
        inst = self._running_instance(req.instance_id)
        self._forward(self._agent_of(inst.agent_id), inst, protocol.WRITE_FILE,
                      {"path": req.path, "content": req.content, "mode": req.mode}, envelope, msg_id, REQUEST_TIMEOUT_S)

    def on_read_file(self, envelope: Envelope, msg_id: Any, req: schemas.ReadFile) -> None:
        inst = self._running_instance(req.instance_id)
        self._forward(self._agent_of(inst.agent_id), inst, protocol.READ_FILE, {"path": req.path, "limit": req.limit},
                      envelope, msg_id, REQUEST_TIMEOUT_S)

    def on_close_instance(self, envelope: Envelope, msg_id: Any, req: schemas.CloseInstance) -> None:
        inst = self._instance(req.instance_id)
        if inst.state in ENDED_STATES:
            if inst.state == State.LOST:  # an expired one is forgotten once its agent confirms the close
                del self.pool.instances[inst.instance_id]
            self.send(envelope, protocol.reply(msg_id, {"instance_id": inst.instance_id, "closed": True,
                                                        inst.state.value: True}))
            return
        self._check_usable(inst, (State.RUNNING,))
        inst.closing()
        self._forward(self._agent_of(inst.agent_id), inst, protocol.CLOSE_INSTANCE, {}, envelope, msg_id, REQUEST_TIMEOUT_S)

    def _agent_of(self, agent_id: str) -> Agent:
        """The agent of an instance or snapshot this broker holds: one it has not lost (losing an agent
        ends its instances and drops its snapshots)."""
        return cast(Agent, self.pool.agent_by_id(agent_id))

    def _instance(self, instance_id: str) -> Instance:
        inst = self.pool.instances.get(instance_id)
        if inst is None:
            if self._rejoining() and instance_id not in self.known_ids:
                raise ServiceError("unavailable", f"no instance {instance_id!r} yet: the broker restarted lately, "
                                                   "and agents are bringing back the instances they hold")
            raise ServiceError("not_found", f"no instance {instance_id!r}")
        return inst

    def _rejoining(self) -> bool:
        """Whether agents may still bring back instances this broker never heard of (it started lately)."""
        return time.monotonic() < self.rejoin_until

    def _remember(self, instance_id: str) -> None:
        """Within the rejoin window, ids this broker knew: once gone they were closed (`not_found`)."""
        if self._rejoining():
            self.known_ids.add(instance_id)

    def _running_instance(self, instance_id: str) -> Instance:
        inst = self._instance(instance_id)
        self._check_usable(inst, (State.RUNNING,))
        inst.last_used = time.monotonic()
        return inst

    def _check_usable(self, inst: Instance, states: tuple[State, ...]) -> None:
        """Raise the error that says why a request cannot go to this instance in its state."""
        if inst.state in states:
            return
        if inst.state == State.POOLED or inst.pooled_for:  # no client was given its id
            raise ServiceError("not_found", f"no instance {inst.instance_id!r}")
        if inst.state == State.LOST:
            raise ServiceError("agent_lost", f"instance {inst.instance_id} was lost (its agent {inst.agent_id} or its "
                                              "environment went away)")
        if inst.state == State.EXPIRED:
            raise ServiceError("expired", f"instance {inst.instance_id} expired: its lease ended")
        if inst.state == State.UNREACHABLE:
            raise ServiceError("unreachable", f"agent {inst.agent_id} of instance {inst.instance_id} is not "
                                               f"answering; it is lost after {self.agent_grace_s:g}s more of silence")
        raise ServiceError("conflict", f"instance {inst.instance_id} is {inst.state}")

    def _forward(self, agent: Agent, inst: Instance, kind: str, fields: dict[str, Any], envelope: Envelope | None,
                 client_id: object, timeout_s: float, forks: tuple[str, ...] | list[str] = ()) -> None:
        request_id = f"b{next(self._ids)}"
        self.pending[request_id] = Pending(kind, envelope, client_id, agent.agent_id, inst.instance_id,
                                           time.monotonic() + timeout_s, env_type=inst.config["type"], forks=forks)
        if not self.send([agent.identity], protocol.request(kind, request_id, instance_id=inst.instance_id, **fields)):
            self._lose_agent(agent, "unreachable")
