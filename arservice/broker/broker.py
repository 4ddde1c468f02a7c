"""The broker: one thread, one ROUTER socket, one handler per message type.

Agents and clients share the ROUTER (bound on TCP, and on inproc for the HTTP front end);
the message type tells them apart. The loop never blocks on anything but the poller:
commands, environment starts and everything slow happen on agents.
"""

import itertools
import secrets
import time
import traceback

import zmq

from .. import curve, environments, protocol
from ..logs import EventLog
from ..protocol import MAX_MESSAGE_BYTES, MAX_SECONDS, ProtocolError, field, text
from .metrics import BrokerMetrics, waiting_by_type
from .state import (
    ENDED_STATES,
    Agent,
    Instance,
    Pending,
    Pool,
    WaitingStart,
    cost_of,
    to_units,
)

log = EventLog("broker")

INPROC_ADDRESS = "inproc://arservice-broker"
# An agent answers after the command's own time limit; allow it this much more.
ANSWER_GRACE_S = 10.0
REQUEST_TIMEOUT_S = 60.0
LOST_INSTANCE_KEEP_S = 3600.0
# The longest a start may wait for room when it asks (wait_s), whatever --start-wait says.
MAX_START_WAIT_S = 3600.0
TICK_S = 0.1
# Frames queued per peer before libzmq stops reading from it (TCP pushes back on the sender).
RECEIVE_QUEUE = 1000
AGENT_TYPES = (protocol.HEARTBEAT, protocol.DISCONNECT, protocol.REPLY, protocol.ERROR)


class Broker:
    def __init__(self, bind, *, context=None, limits=None, presets=None, token=None, agent_secret=None,
                 heartbeat_s=1.0, agent_timeout_s=5.0, agent_grace_s=60.0, start_wait_s=0.0,
                 instance_ttl_s=None, idle_timeout_s=None):
        self.ctx = context or zmq.Context.instance()
        self.pool = Pool(limits or {})
        self.presets = presets or {}
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
        self.pending = {}  # broker request id -> Pending
        # How long a start may wait for an agent with room (a runner may be starting one); 0: refuse at once.
        self.start_wait_s = start_wait_s
        self.waiting = []  # WaitingStart, oldest first
        self.runner_status = None  # what the runner last reported, shown in resources
        self.lost_agents = set()  # agent ids this broker declared lost: it adopts nothing from them
        # Until then an unknown instance id may be one an agent has not brought back yet (this broker restarted).
        # (Not once it started one itself: then the ids it does not know are ones it closed.)
        self.rejoin_until = time.monotonic() + agent_timeout_s
        self.started_any = False
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
        self.handlers = {
            protocol.REGISTER: self.on_register,
            protocol.HEARTBEAT: self.on_heartbeat,
            protocol.DISCONNECT: self.on_disconnect,
            protocol.REPLY: self.on_agent_answer,
            protocol.ERROR: self.on_agent_answer,
            protocol.START_INSTANCE: self.on_start_instance,
            protocol.EXECUTE: self.on_execute,
            protocol.CLOSE_INSTANCE: self.on_close_instance,
            protocol.WRITE_FILE: self.on_file_request,
            protocol.READ_FILE: self.on_file_request,
            protocol.RESOURCES: self.on_resources,
            protocol.INSTANCES: self.on_instances,
            protocol.PING: self.on_ping,
            protocol.RENEW: self.on_renew,
            protocol.RUNNER_STATUS: self.on_runner_status,
            protocol.RELEASE_AGENT: self.on_release_agent,
            protocol.METRICS: self.on_metrics,
            protocol.STATUS: self.on_status,
        }
        self.client_types = {protocol.START_INSTANCE, protocol.EXECUTE, protocol.CLOSE_INSTANCE,
                             protocol.WRITE_FILE, protocol.READ_FILE, protocol.RESOURCES,
                             protocol.INSTANCES, protocol.PING, protocol.RUNNER_STATUS, protocol.RELEASE_AGENT,
                             protocol.METRICS, protocol.STATUS, protocol.RENEW}

    def stop(self):
        """Ask the loop to end within one tick; safe from any thread."""
        self._stopping = True

    def run(self):
        log.info("broker_started", address=self.address, limits=self.pool.limits)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.sock, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._stopping:
                ready = dict(poller.poll(timeout=max(0.0, next_tick - time.monotonic()) * 1000))
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

    def _drain(self):
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(*protocol.unwrap(frames))

    def handle(self, envelope, frames):
        msg_id = None
        msg = {}
        try:
            payload = protocol.joined(frames)
            head = protocol.peek(payload)
            msg_id = head.get("id")
            self._admit(envelope, head)
            msg = protocol.decode(payload)
            self.handlers[msg["type"]](envelope, msg)
        except ProtocolError as exc:
            self.metrics.error(msg.get("type"), exc.code, exc.message, msg.get("instance_id"))
            self.send(envelope, protocol.error(msg_id, exc.code, exc.message))
        except Exception as exc:  # a bug must cost one request, never the broker
            log.error("handler_failed", error=repr(exc), trace=traceback.format_exc().replace("\n", " | "))
            self.metrics.error(msg.get("type"), "internal", repr(exc), msg.get("instance_id"))
            self.send(envelope, protocol.error(msg_id, "internal", f"internal error: {exc!r}"))

    def send(self, envelope, msg):
        """Send to a peer; False if it is gone (its messages are then dropped)."""
        try:
            self.sock.send_multipart([*envelope, protocol.encode(msg)])
            return True
        except zmq.ZMQError as exc:
            log.debug("peer_unreachable", peer=envelope[0].hex() if envelope else "", error=exc.strerror)
            return False

    def _admit(self, envelope, head):
        """Refuse a frame whose sender may not send it, from its envelope alone (before it is parsed)."""
        kind = head["type"]
        if kind not in self.handlers:
            raise ProtocolError("invalid_request", f"unknown message type {kind!r}")
        if kind in self.client_types:
            if self.token and not protocol.same_secret(head.get("token"), self.token):
                raise ProtocolError("unauthorized", "missing or wrong token")
            if "id" not in head:
                raise ProtocolError("invalid_request", "missing required field 'id'")
        elif kind == protocol.REGISTER:
            if self.agent_secret and not protocol.same_secret(head.get("secret"), self.agent_secret):
                log.warning("agent_refused", reason="wrong secret")
                raise ProtocolError("unauthorized", "wrong agent secret")
        elif not envelope or envelope[0] not in self.pool.agents:
            raise ProtocolError("not_registered", "this agent is not registered (lost or unknown); register again")

    # -- time ---------------------------------------------------------------------

    def tick(self, now):
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
        if beat:
            self._end_leases(now)

    def _end_leases(self, now):
        """Close the instances whose lease ended; forget ended ones after a while."""
        wall = time.time()
        busy = None
        for inst in list(self.pool.instances.values()):
            if inst.state in ENDED_STATES:
                if wall - inst.ended_at > LOST_INSTANCE_KEEP_S:
                    del self.pool.instances[inst.instance_id]
                continue
            why = inst.state == "running" and inst.lease_over(now)
            if not why:
                continue
            if busy is None:  # a command in flight is use, however long it runs
                busy = {p.instance_id for p in self.pending.values()}
            if why == "idle" and inst.instance_id in busy:
                continue
            inst.state, inst.ended_at = "expired", wall
            self.metrics.instance_expired(why)
            log.warning("instance_expired", instance=inst.instance_id, agent=inst.agent_id, reason=why)
            self._forward(self.pool.agent_by_id(inst.agent_id), inst, protocol.CLOSE_INSTANCE, {}, None, None,
                          REQUEST_TIMEOUT_S)

    def _expire(self, pending):
        inst = self.pool.instances.get(pending.instance_id)
        what = f"{pending.kind} on instance {pending.instance_id}"
        log.warning("request_timed_out", kind=pending.kind, instance=pending.instance_id, agent=pending.agent_id)
        if inst is not None and pending.kind in (protocol.START_INSTANCE, protocol.CLOSE_INSTANCE):
            self.pool.release(inst)
            agent = self.pool.agent_by_id(inst.agent_id)
            if agent is not None and pending.kind == protocol.START_INSTANCE:
                # The agent may still finish the start; make sure that instance goes away.
                self._forward(agent, inst, protocol.CLOSE_INSTANCE, {}, None, None, REQUEST_TIMEOUT_S)
        self._answer_client(pending, protocol.error(pending.client_id, "timeout", f"agent {pending.agent_id} did not answer {what} in time"))

    def _answer_client(self, pending, msg):
        self.metrics.answered(pending, msg)
        if pending.envelope is not None:
            msg["id"] = pending.client_id
            self.send(pending.envelope, msg)

    # -- agents -------------------------------------------------------------------

    def on_register(self, envelope, msg):
        identity = envelope[0]
        agent_id = field(msg, "agent_id", str)
        if agent_id.encode() != identity:
            raise ProtocolError("invalid_request", "agent_id must be the agent socket's identity")
        capacity = field(msg, "capacity", dict)
        capacity = {name: field(capacity, name, float, default=None, check=lambda n: 0 <= n <= protocol.MAX_INT,
                                what="a non-negative number") for name in ("instances", "cpus", "memory")}
        env_types = field(msg, "env_types", list)
        old = self.pool.agents.get(identity)
        if old is not None:
            self._lose_agent(old, "registered again")
        held = field(msg, "instances", list, default=[])
        now = time.monotonic()
        agent = self.pool.agents[identity] = Agent(
            identity, agent_id, to_units(capacity),
            [t for t in env_types if isinstance(t, str)], str(msg.get("hostname", "")), msg.get("pid"),
            msg.get("slurm_job_id"), now,
        )
        drop = [self._adopt(agent, item) for item in held]
        drop = [instance_id for instance_id in drop if instance_id]
        self.metrics.agent_registered()
        log.info("agent_registered", agent=agent_id, capacity=capacity, types=",".join(map(str, env_types)),
                 slurm_job=msg.get("slurm_job_id"), adopted=len(held) - len(drop), dropped=len(drop))
        self.send(envelope, protocol.reply(msg.get("id"), {"registered": True, "heartbeat_s": self.heartbeat_s,
                                                           "drop": drop}))
        if self.waiting:
            self._place_waiting(now)

    def _adopt(self, agent, item):
        """Take on an instance an agent held through a broker restart, with its id, spec and info;
        return its id if the agent must close it instead (this broker ended it, or cannot read it)."""
        instance_id = item.get("instance_id") if isinstance(item, dict) else None
        if not isinstance(instance_id, str):
            return None
        if instance_id in self.pool.instances or agent.agent_id in self.lost_agents:
            return instance_id  # this broker declared it lost or expired (a client was told so): it stays so
        try:
            spec = protocol.check_value(field(item, "environment", dict), "environment")
            config = environments.backend(spec.get("type")).parse_config(spec)
        except ProtocolError as exc:
            log.warning("adoption_refused", agent=agent.agent_id, instance=instance_id, error=exc.message)
            return instance_id
        inst = Instance(instance_id, agent.agent_id, spec, config, ttl_s=config["ttl"] or self.instance_ttl_s,
                        idle_s=config["idle_timeout"] or self.idle_timeout_s)
        inst.state = "running"
        inst.info = protocol.check_value(item.get("info") if isinstance(item.get("info"), dict) else {}, "info")
        self.pool.admit(inst, agent)
        log.info("instance_adopted", instance=instance_id, agent=agent.agent_id, type=config["type"])
        return None

    def _agent(self, envelope):
        agent = self.pool.agents.get(envelope[0]) if envelope else None
        if agent is None:
            raise ProtocolError("not_registered", "this agent is not registered (lost or unknown); register again")
        agent.last_seen = time.monotonic()
        if agent.unreachable_since is not None:
            self._agent_back(agent)
        return agent

    def _lose_instance(self, inst, agent, reason):
        """The agent found the instance's environment gone (its container ended, dockerd lost it):
        it is lost, its capacity is free, and the agent removes what is left of it."""
        log.warning("instance_lost", instance=inst.instance_id, agent=agent.agent_id, reason=reason)
        inst.state, inst.ended_at = "lost", time.time()
        self.pool.release(inst)
        self._forward(agent, inst, protocol.CLOSE_INSTANCE, {}, None, None, REQUEST_TIMEOUT_S)

    def _agent_unreachable(self, agent, now):
        """A silent agent may be stopped or cut off, not dead: its instances wait for it, for the grace."""
        agent.unreachable_since = now
        self.metrics.agent_unreachable()
        log.warning("agent_unreachable", agent=agent.agent_id, silent_s=round(now - agent.last_seen, 1),
                    grace_s=self.agent_grace_s, instances=len(agent.instance_ids))
        for instance_id in agent.instance_ids:
            inst = self.pool.instances[instance_id]
            if inst.state == "running":
                inst.state = "unreachable"

    def _agent_back(self, agent):
        log.info("agent_back", agent=agent.agent_id, after_s=round(agent.last_seen - agent.unreachable_since, 1))
        agent.unreachable_since = None
        for instance_id in agent.instance_ids:
            inst = self.pool.instances[instance_id]
            if inst.state == "unreachable":
                inst.state = "running"
                inst.last_used = agent.last_seen  # its owner could not use it meanwhile

    def on_heartbeat(self, envelope, msg):
        self._agent(envelope)

    def on_disconnect(self, envelope, msg):
        agent = self.pool.agents.get(envelope[0])
        if agent is not None:
            self._lose_agent(agent, "disconnected")

    def _lose_agent(self, agent, reason):
        """Forget an agent: its instances become lost and its capacity leaves the pool."""
        # A released (draining) agent going away is what its runner asked for.
        (log.info if agent.draining else log.warning)("agent_lost", agent=agent.agent_id, reason=reason,
                                                      instances=len(agent.instance_ids))
        self.pool.drop_agent(agent)
        self.lost_agents.add(agent.agent_id)
        self.metrics.agent_lost(agent)
        for request_id, pending in list(self.pending.items()):
            if pending.agent_id == agent.agent_id:
                del self.pending[request_id]
                self._answer_client(pending, protocol.error(None, "agent_lost", f"agent {agent.agent_id} was lost: {reason}"))

    def on_agent_answer(self, envelope, msg):
        agent = self._agent(envelope)
        pending = self.pending.get(msg.get("id"))
        if pending is None or pending.agent_id != agent.agent_id:
            return  # the answer to a request that already timed out
        del self.pending[msg["id"]]
        inst = self.pool.instances.get(pending.instance_id)
        ok = msg["type"] == protocol.REPLY
        result = msg.get("result") if ok else None
        if pending.kind == protocol.START_INSTANCE and inst is not None:
            if ok:
                inst.state = "running"
                inst.last_used = time.monotonic()
                inst.info = result.get("info") or {}
                result = {"instance_id": inst.instance_id, "agent_id": inst.agent_id,
                          "environment": inst.spec, "info": inst.info}
                log.info("instance_started", instance=inst.instance_id, agent=inst.agent_id, type=inst.config["type"])
            else:
                self.pool.release(inst)
                log.warning("instance_start_failed", instance=inst.instance_id, error=msg.get("error"))
        elif pending.kind == protocol.CLOSE_INSTANCE and inst is not None:
            self.pool.release(inst)
            result = {"instance_id": inst.instance_id, "closed": True}
            log.info("instance_closed", instance=inst.instance_id, agent=inst.agent_id)
        if ok:
            self._answer_client(pending, protocol.reply(None, result))
        else:
            error = msg.get("error") or {}
            code = error.get("code") if error.get("code") in protocol.ERROR_CODES else "environment_error"
            if code == "instance_lost" and inst is not None and inst.state == "running":
                self._lose_instance(inst, agent, str(error.get("message", "")))
            self._answer_client(pending, protocol.error(None, code, str(error.get("message", ""))))

    # -- clients ------------------------------------------------------------------

    def on_ping(self, envelope, msg):
        self.send(envelope, protocol.reply(msg["id"], {"pong": True, "agents": len(self.pool.agents)}))

    def on_resources(self, envelope, msg):
        result = self.pool.describe(time.monotonic())
        result["waiting"] = {"starts": len(self.waiting), "by_type": waiting_by_type(self.waiting)}
        if self.runner_status is not None:
            result["runner"] = self.runner_status
        self.send(envelope, protocol.reply(msg["id"], result))

    def on_metrics(self, envelope, msg):
        self.send(envelope, protocol.reply(msg["id"], {"families": self.metrics.families()}))

    def on_status(self, envelope, msg):
        self.send(envelope, protocol.reply(msg["id"], self.metrics.status()))

    def on_runner_status(self, envelope, msg):
        self.runner_status = protocol.check_value(field(msg, "status", dict), "status")
        self.send(envelope, protocol.reply(msg["id"], {}))

    def on_release_agent(self, envelope, msg):
        """A runner wants to stop an agent: allowed only while it holds nothing; it then takes nothing new.
        With drain (its job nears its end) it takes nothing new even while it still holds instances."""
        agent_id = field(msg, "agent_id", str)
        agent = self.pool.agent_by_id(agent_id)
        if agent is None:
            raise ProtocolError("not_found", f"no agent {agent_id!r}")
        busy = len(agent.instance_ids) + sum(p.agent_id == agent_id for p in self.pending.values())
        if busy and not field(msg, "drain", bool, default=False):
            raise ProtocolError("conflict", f"agent {agent_id} is busy ({busy} instances or requests)")
        agent.draining = True
        log.info("agent_released", agent=agent_id)
        self.send(envelope, protocol.reply(msg["id"], {"agent_id": agent_id, "released": True}))

    def on_instances(self, envelope, msg):
        """The instances that match every filter given (env_type: the message's own `type` is taken), in
        instance id order, from after the cursor on.

        Ids are the stable order, so the last id of a page is the cursor for the next one (`next`,
        null on the last page) even while instances come and go between pages."""
        wanted = {name: text(msg, name, default=None) for name in ("state", "agent_id", "env_type")}
        after = text(msg, "after", default="")
        limit = field(msg, "limit", int, default=None, check=lambda n: n > 0, what="a positive number of instances")
        matching = sorted(
            (i for i in self.pool.instances.values()
             if i.instance_id > after
             and (wanted["state"] is None or i.state == wanted["state"])
             and (wanted["agent_id"] is None or i.agent_id == wanted["agent_id"])
             and (wanted["env_type"] is None or i.config["type"] == wanted["env_type"])),
            key=lambda i: i.instance_id)
        page = matching if limit is None else matching[:limit]
        more = len(page) < len(matching)
        self.send(envelope, protocol.reply(msg["id"], {"instances": [i.describe() for i in page],
                                                       "next": page[-1].instance_id if more else None}))

    def on_renew(self, envelope, msg):
        """Keep an instance: its idle clock starts again; a ttl gives it that many seconds from now."""
        inst = self._instance(msg)
        ttl = field(msg, "ttl", float, default=None, check=lambda t: 0 < t <= MAX_SECONDS,
                    what=f"in (0, {MAX_SECONDS:.0f}] seconds")
        self._check_usable(inst, ("running", "starting", "unreachable"))
        now = time.monotonic()
        inst.last_used = now
        if ttl is not None:
            inst.expires_at = now + ttl
        self.send(envelope, protocol.reply(msg["id"], {"instance_id": inst.instance_id, **inst.lease(now)}))

    def on_start_instance(self, envelope, msg):
        spec = msg.get("environment")
        if isinstance(spec, str):
            if spec not in self.presets:
                raise ProtocolError("not_found", f"no environment preset named {spec!r}; known: {', '.join(sorted(self.presets)) or 'none'}")
            spec = self.presets[spec]
        elif not isinstance(spec, dict):
            raise ProtocolError("invalid_request", "field 'environment' must be a preset name or an environment spec object")
        config = environments.backend(spec.get("type")).parse_config(spec)
        wait_s = field(msg, "wait_s", float, default=self.start_wait_s, check=lambda t: 0 <= t <= MAX_START_WAIT_S,
                       what=f"in [0, {MAX_START_WAIT_S:.0f}] seconds")
        # First come, first served: while starts of this type wait, a new one queues behind them.
        queued = any(w.config["type"] == config["type"] for w in self.waiting)
        try:
            if queued and wait_s:
                raise ProtocolError("no_capacity", f"starts of type {config['type']!r} are waiting for room")
            self.pool.check_limits(cost_of(config))
            agent = self.pool.place(config["type"], cost_of(config))
        except ProtocolError as exc:
            if not wait_s:
                raise
            self.waiting.append(WaitingStart(envelope, msg["id"], spec, config, wait_s))
            log.info("start_waiting", type=config["type"], waiting=len(self.waiting), reason=exc.message)
            return
        self._start_on(agent, spec, config, envelope, msg["id"])

    def _start_on(self, agent, spec, config, envelope, client_id):
        self.started_any = True
        inst = Instance(f"i-{secrets.token_hex(6)}", agent.agent_id, spec, config,
                        ttl_s=config["ttl"] or self.instance_ttl_s, idle_s=config["idle_timeout"] or self.idle_timeout_s)
        self.pool.admit(inst, agent)
        self._forward(agent, inst, protocol.START_INSTANCE, {"environment": spec}, envelope, client_id, config["start_timeout"])

    def _place_waiting(self, now):
        """Start the waiting starts that fit now, oldest first; refuse the ones that waited too long."""
        still = []
        for waiting in self.waiting:
            cost = cost_of(waiting.config)
            try:
                self.pool.check_limits(cost)
                agent = self.pool.place(waiting.config["type"], cost)
            except ProtocolError as exc:
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

    def on_execute(self, envelope, msg):
        inst = self._running_instance(msg)
        timeout = field(msg, "timeout", float, default=inst.config["timeout"], check=lambda t: 0 < t <= MAX_SECONDS,
                        what=f"in (0, {MAX_SECONDS:.0f}] seconds")
        fields = {
            "command": text(msg, "command"),
            "timeout": timeout,
            "cwd": text(msg, "cwd", default=None),
            "env": protocol.string_map(msg, "env"),
            "output_limit": field(msg, "output_limit", int, default=inst.config["output_limit"],
                                  check=lambda n: 0 < n <= environments.base.MAX_OUTPUT_LIMIT, what="a positive byte count up to 64 MiB"),
        }
        self._forward(self.pool.agent_by_id(inst.agent_id), inst, protocol.EXECUTE, fields, envelope, msg["id"], timeout + ANSWER_GRACE_S)

    def on_file_request(self, envelope, msg):
        inst = self._running_instance(msg)
        fields = {"path": text(msg, "path")}
        if msg["type"] == protocol.WRITE_FILE:
            fields["content"] = field(msg, "content", (bytes, str))
            fields["mode"] = field(msg, "mode", int, default=0o644, check=lambda m: 0 <= m <= 0o7777, what="a file mode like 0o644")
        else:
            fields["limit"] = field(msg, "limit", int, default=environments.base.MAX_OUTPUT_LIMIT,
                                    check=lambda n: 0 < n <= environments.base.MAX_OUTPUT_LIMIT, what="a positive byte count up to 64 MiB")
        self._forward(self.pool.agent_by_id(inst.agent_id), inst, msg["type"], fields, envelope, msg["id"], REQUEST_TIMEOUT_S)

    def on_close_instance(self, envelope, msg):
        inst = self._instance(msg)
        if inst.state in ENDED_STATES:
            if inst.state == "lost":  # an expired one is forgotten once its agent confirms the close
                del self.pool.instances[inst.instance_id]
            self.send(envelope, protocol.reply(msg["id"], {"instance_id": inst.instance_id, "closed": True,
                                                           inst.state: True}))
            return
        self._check_usable(inst, ("running",))
        inst.state = "closing"
        self._forward(self.pool.agent_by_id(inst.agent_id), inst, protocol.CLOSE_INSTANCE, {}, envelope, msg["id"], REQUEST_TIMEOUT_S)

    def _instance(self, msg):
        instance_id = field(msg, "instance_id", str)
        inst = self.pool.instances.get(instance_id)
        if inst is None:
            if time.monotonic() < self.rejoin_until and not self.started_any:
                raise ProtocolError("unavailable", f"no instance {instance_id!r} yet: the broker just started, and "
                                                   "agents are bringing back the instances they hold")
            raise ProtocolError("not_found", f"no instance {instance_id!r}")
        return inst

    def _running_instance(self, msg):
        inst = self._instance(msg)
        self._check_usable(inst, ("running",))
        inst.last_used = time.monotonic()
        return inst

    def _check_usable(self, inst, states):
        """Raise the error that says why a request cannot go to this instance in its state."""
        if inst.state in states:
            return
        if inst.state == "lost":
            raise ProtocolError("agent_lost", f"instance {inst.instance_id} was lost (its agent {inst.agent_id} or its "
                                              "environment went away)")
        if inst.state == "expired":
            raise ProtocolError("expired", f"instance {inst.instance_id} expired: its lease ended")
        if inst.state == "unreachable":
            raise ProtocolError("unreachable", f"agent {inst.agent_id} of instance {inst.instance_id} is not "
                                               f"answering; it is lost after {self.agent_grace_s:g}s more of silence")
        raise ProtocolError("conflict", f"instance {inst.instance_id} is {inst.state}")

    def _forward(self, agent, inst, kind, fields, envelope, client_id, timeout_s):
        request_id = f"b{next(self._ids)}"
        self.pending[request_id] = Pending(kind, envelope, client_id, agent.agent_id, inst.instance_id,
                                           time.monotonic() + timeout_s, env_type=inst.config["type"])
        if not self.send([agent.identity], protocol.request(kind, request_id, instance_id=inst.instance_id, **fields)):
            self._lose_agent(agent, "unreachable")
