"""The agent: a headless worker that owns environment instances and runs commands in them.

One thread owns the DEALER socket to the broker and the table of instances. Commands
(Environment.spawn: host processes, and commands started through a container's exec helper)
are driven by that loop itself: their file descriptors sit in the same poller as the socket,
so thousands of commands cost no thread and no thread handoff. Work that blocks (starting an
environment, closing it, files, the plain-exec fallback) goes to a thread pool; each worker
hands its answer back through an inproc PUSH socket that the loop polls. Either way a slow
command never delays another one or the heartbeat.
"""

import os
import resource
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import curve, environments, protocol, schemas
from ..environments import session
from ..environments.process import AGENT_MARK, Watched, marked_processes
from ..logs import EventLog
from ..protocol import ServiceError
from . import streams, workdirs

if TYPE_CHECKING:
    from ..environments.base import Environment

log = EventLog("agent")

SNAPSHOTS_DIR = "snapshots"  # in the agent's directory: the files of its named snapshots
DEFAULT_STOP_TIMEOUT_S = 20.0
# Every process an agent starts inherits this variable naming the agent: what a later agent of the
# host finds them by, once their agent died without closing them (SIGKILL, OOM kill).
# How often the output of streamed commands is looked at (files do not wake a poller).
STREAM_POLL_S = 0.002
# How long a session request waits for its instance's start to be marked done after its answer went out.
START_SETTLE_S = 1.0
# What is left of the stop time for flushing the goodbye to the broker.
FLUSH_TIMEOUT_S = 2.0
# A backend's reap that failed (its engine restarting) is tried again this many times in all, this far apart.
REAP_TRIES = 4
REAP_RETRY_S = 5.0


class AgentExit(Exception):
    """The broker refused this agent (for example a wrong secret); the agent cannot go on."""


class Agent:
    def __init__(self, broker: str, *, instances: int | None = 4, cpus: float | None = None, memory: int | None = None,
                 env_types: list[str] | None = None, secret: str | None = None, token: str | None = None,
                 agent_id: str | None = None, heartbeat_s: float = 1.0, broker_timeout_s: float = 15.0,
                 workdir_root: str | None = None, max_concurrent: int = 256,
                 stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        self.broker = broker
        self.agent_id = agent_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.capacity: dict[str, Any] = {"instances": instances, "cpus": cpus, "memory": memory}
        self.env_types = env_types or environments.available_types()
        # The service's token keys the CURVE handshake and is the registration secret; a broker without
        # a token takes a secret of its own (its runner's, or --agent-secret-file) in the registration only.
        self.token = token
        self.secret = secret or token
        self.heartbeat_s = heartbeat_s
        self.broker_timeout_s = broker_timeout_s
        self.workdir_root = workdir_root or workdirs.DEFAULT_ROOT
        # Closing instances on the way out gets this long; a worker thread still blocked then
        # (a hung container engine, say) is abandoned: the caller exits the process without
        # joining it (see cli.agent_command).
        self.stop_timeout_s = stop_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="work")
        # instance id -> (Environment, Future of its start); touched only by the loop
        self.envs: dict[str, tuple[Environment, Future[Any]]] = {}
        # name -> (backend class, handle, source instance id): set by a worker thread once made
        self.snapshots: dict[str, tuple[type[Environment], Any, str]] = {}
        self.commands: dict[str, Watched] = {}  # request id -> environments.process.Watched driven by the loop
        self.command_fds: dict[int, str] = {}  # fd being watched -> request id
        self.sessions: dict[str, session.SessionTable] = {}  # by instance id; touched only by the loop
        # request id -> agent.streams tail of a command whose output is streamed
        self.streams: dict[str, streams.FileTail | streams.PipeTee] = {}
        self.stopping = threading.Event()
        self.ctx = zmq.Context()
        self.outbox_address = f"inproc://outbox-{id(self)}"
        self._outbox_sockets = threading.local()
        self._next_id = 0

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self.stopping.set()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() or until the broker is gone; clean up every instance however it ends.

        Returns within stop_timeout_s (plus a moment) of stop(), whatever the worker threads are
        doing; they are not joined, so the process must end with os._exit."""
        raise_file_limit()
        os.environ[AGENT_MARK] = self.agent_id
        self.workdir = workdirs.claim(self.workdir_root, self.agent_id)
        # Off the loop: reaping asks container engines (hundreds of ms) and must not delay registering;
        # it only touches what dead agents left, never this agent's instances.
        self.pool.submit(self._reap_leftovers)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.agent_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        if self.token:
            curve.secure_client(self.sock, self.token)
        # What says that the broker refused the handshake (a wrong token, or a token where it has none or
        # none where it has one), before any registration could be answered.
        self.handshake = self.sock.get_monitor_socket(curve.Handshakes.EVENTS)
        self.handshakes = curve.Handshakes(with_token=bool(self.token))
        self.sock.connect(self.broker)
        outbox = self.ctx.socket(zmq.PULL)
        outbox.bind(self.outbox_address)
        self.poller = poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        poller.register(self.handshake, zmq.POLLIN)
        log.info("agent_started", agent=self.agent_id, broker=self.broker, capacity=self.capacity, types=",".join(self.env_types))
        self.registered = False
        self.last_heard = time.monotonic()
        next_beat = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now - self.last_heard > self.broker_timeout_s:
                    log.warning("broker_lost", agent=self.agent_id, silent_s=round(now - self.last_heard, 1))
                    break
                if now >= next_beat:
                    # Until registered, the heartbeat is a registration attempt.
                    self._send(protocol.request(protocol.HEARTBEAT, self._id(), instances=len(self.envs))
                               if self.registered else self._register_message())
                    next_beat = now + self.heartbeat_s
                wake = min([next_beat, now + 0.5] + [c.deadline for c in self.commands.values()]
                           + ([now + STREAM_POLL_S] if self.streams else []))
                for sock, _ in poller.poll(timeout=max(0, wake - time.monotonic()) * 1000):  # type: ignore[arg-type]  # pyzmq takes float ms
                    self._guarded(self._on_ready, sock, outbox)
                self._guarded(self._expire_commands)
                self._guarded(self._pump_streams)
        finally:
            # However the loop ended (stop(), refused, broker gone): what waits on stopping ends now,
            # the start-up reap's retries for an engine that is down among them.
            self.stopping.set()
            self._close_all()
            for cls, handle, _ in self.snapshots.values():  # after the instances: none uses them now
                try:
                    cls.drop_snapshot(handle)
                except Exception as exc:  # noqa: BLE001 (the reaper of a later agent removes it)
                    log.error("snapshot_drop_failed", error=repr(exc))
            for request_id in list(self.commands):
                if request_id in self.commands:  # a session's end may have answered its command already
                    self.commands[request_id].kill()
                    self._finish_command(request_id)
            if self.registered:
                self._send(protocol.request(protocol.DISCONNECT, self._id()))
            self.pool.shutdown(wait=False, cancel_futures=True)
            outbox.close(linger=0)
            self.sock.disable_monitor()
            self.handshake.close(linger=0)
            self.sock.close()
            # term() waits for every socket: one held by a worker thread still blocked would make it wait forever.
            closing = threading.Thread(target=self.ctx.term, name="zmq-term", daemon=True)
            closing.start()
            closing.join(FLUSH_TIMEOUT_S)
            workdirs.release(self.workdir)
            log.info("agent_stopped", agent=self.agent_id)

    def _on_ready(self, sock, outbox):
        if sock is outbox:
            self._forward_answer(outbox.recv_multipart(copy=False))
        elif sock is self.sock:
            self._on_broker_frame(self.sock.recv())
        elif sock is self.handshake:
            event = recv_monitor_message(self.handshake)
            refusal = self.handshakes.refusal(event["event"], event["value"])
            if refusal is not None:
                raise AgentExit(f"broker refused registration: wrong agent secret: {refusal}")
        elif sock in self.command_fds:
            self._on_command_fd(sock)

    def _guarded(self, handle, *args):
        """The last resort: whatever one event raises costs that event, never the agent and its instances."""
        try:
            handle(*args)
        except AgentExit:
            raise
        except Exception as exc:  # noqa: BLE001 (the point of a last resort)
            log.error("event_failed", agent=self.agent_id, error=repr(exc), trace=traceback.format_exc().replace("\n", " | "))

    def _reap_leftovers(self):
        """Remove what dead agents of this host left behind, for every backend offered."""
        killed = kill_orphans(socket.gethostname())
        if killed:
            log.info("reaped_processes", count=len(killed), pids=",".join(map(str, killed)))
        failed = list(self.env_types)
        for attempt in range(REAP_TRIES):  # an engine restarting now answers in a while
            # Done once every backend has answered: the agent's exit waits for this reap.
            if not failed or (attempt and self.stopping.wait(REAP_RETRY_S)):
                return
            for name in list(failed):
                try:
                    reaped = environments.backend(name).reap(socket.gethostname(), workdirs.alive)
                except Exception as exc:
                    log.warning("reap_failed", type=name, error=repr(exc))
                    continue
                failed.remove(name)
                if reaped:
                    log.info("reaped_leftovers", type=name, count=len(reaped))

    def _id(self):
        self._next_id += 1
        return f"{self.agent_id}:{self._next_id}"

    def _send(self, msg):
        self._send_frame(protocol.encode(msg))

    def _send_frame(self, frame):
        """Never blocks the loop. A DEALER with no connection to send on blocks a send for as long as
        that lasts: an agent in a Slurm job whose broker was gone hung so, never reaching its broker
        timeout, and its job lived on. What cannot go now is dropped: registrations and heartbeats
        go again, and a broker that is gone waits for no answer."""
        # A broker with a token reads frames of at most protocol.MAX_FRAME_BYTES; one without takes any.
        try:
            # copy=False: libzmq sends from the frame's own bytes (a 64 MiB output is not copied again).
            self.sock.send_multipart(protocol.split(frame) if self.token else [frame], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("send_dropped", bytes=len(frame))

    def _register_message(self):
        # The instances it holds, started and well: a broker that restarted (or lost this agent) adopts them.
        held = [{"instance_id": instance_id, "environment": env.spec, "info": env.info}
                for instance_id, (env, started) in self.envs.items()
                if started.done() and started.exception() is None]
        snapshots = [{"name": name, "type": cls.type, "source": source}
                     for name, (cls, _, source) in list(self.snapshots.items())]
        return protocol.request(
            protocol.REGISTER, self._id(), agent_id=self.agent_id, secret=self.secret,
            capacity=self.capacity, env_types=self.env_types, hostname=socket.gethostname(),
            pid=os.getpid(), slurm_job_id=os.environ.get("SLURM_JOB_ID"), instances=held, snapshots=snapshots,
        )

    def _on_broker_frame(self, frame):
        self.last_heard = time.monotonic()
        try:
            msg = protocol.decode(frame)
        except ServiceError as exc:
            log.warning("bad_frame_from_broker", error=exc.message)
            return
        kind = msg["type"]
        if kind == protocol.REPLY and not self.registered and msg.get("result", {}).get("registered"):
            self.registered = True
            dropped = msg["result"].get("drop") or []
            log.info("registered", agent=self.agent_id, broker=self.broker, instances=len(self.envs) - len(dropped))
            for instance_id in dropped:
                if instance_id in self.envs:
                    self.pool.submit(_close_quietly, self.envs.pop(instance_id)[0])
        elif kind == protocol.ERROR:
            self._on_broker_error(msg.get("error") or {})
        elif kind in REQUEST_HANDLERS:
            try:
                REQUEST_HANDLERS[kind](self, msg["id"], schemas.fields_of(msg, schemas.AGENT_REQUESTS[kind]))
            except ServiceError as exc:
                self._send(protocol.error(msg.get("id"), exc.code, exc.message))
            except Exception as exc:  # noqa: BLE001 (a backend's surprise costs this request only)
                log.error("request_failed", request=msg.get("id"), error=repr(exc))
                self._send(protocol.error(msg.get("id"), "environment_error", f"{exc.__class__.__name__}: {exc}"))
        elif kind not in (protocol.HEARTBEAT, protocol.REPLY):
            self._send(protocol.error(msg.get("id"), "invalid_request", f"agents do not handle {kind!r} messages"))

    def _on_broker_error(self, error):
        code = error.get("code")
        if code == "unauthorized":
            raise AgentExit(f"broker refused registration: {error.get('message')}")
        if code == "not_registered":
            # The broker no longer counts this agent (it restarted, or declared this agent lost):
            # register again with the instances held; the broker adopts them, or names the ones
            # it gave up on (lost, closed) for this agent to close.
            if self.registered:
                log.warning("broker_forgot_agent", agent=self.agent_id, instances=len(self.envs))
            self.registered = False
        else:
            log.warning("broker_error", code=code, message=error.get("message"))

    # -- instance requests: validate on the loop, run on the pool ----------------

    def _on_start_instance(self, request_id: Any, req: schemas.AgentStart) -> None:
        instance_id = req.instance_id
        if instance_id in self.envs:
            raise ServiceError("conflict", f"instance {instance_id} exists already")
        spec = req.environment
        cls = environments.backend(spec.get("type"))
        env = cls(instance_id, cls.parse_config(spec), self.agent_id, self.workdir)
        env.spec, env.info = spec, {}  # what a broker needs to adopt the instance
        if env.config["snapshot"] is not None:
            if env.config["snapshot"] not in self.snapshots:
                raise ServiceError("not_found", f"no snapshot {env.config['snapshot']!r} on agent {self.agent_id}")
            env.seed = self.snapshots[env.config["snapshot"]][1]
        started = self.pool.submit(self._start, request_id, env)
        self.envs[instance_id] = (env, started)

    def _on_fork_instance(self, request_id: Any, req: schemas.AgentFork) -> None:
        source, source_started = self._instance(req.instance_id)
        new_ids = req.new_ids
        if any(i in self.envs for i in new_ids) or len(set(new_ids)) != len(new_ids):
            raise ServiceError("invalid_request", "new_ids must be new, distinct instance ids")
        cls = type(source)
        forks = [cls(new_id, source.config, self.agent_id, self.workdir) for new_id in new_ids]
        for fork in forks:
            fork.spec, fork.info = source.spec, {}

        def fork_all():
            source_started.result()
            try:
                for fork, info in zip(forks, source.fork(forks), strict=True):
                    fork.info = info
            except BaseException:
                for fork in forks:
                    _close_quietly(fork)
                raise
            return {"instances": [{"instance_id": f.instance_id, "info": f.info} for f in forks]}

        def forked():
            if not self._answer(request_id, fork_all, drop_on_error=" ".join(new_ids)):
                raise RuntimeError("fork failed")  # fails the work queued behind it
        done = self.pool.submit(forked)
        for fork in forks:
            self.envs[fork.instance_id] = (fork, done)

    def _on_snapshot_instance(self, request_id: Any, req: schemas.SnapshotInstance) -> None:
        env, started = self._instance(req.instance_id)
        name = req.name  # a name the schema allows cannot leave the snapshots' directory
        if name in self.snapshots:
            raise ServiceError("conflict", f"snapshot {name!r} exists")
        directory = os.path.join(self.workdir, SNAPSHOTS_DIR, name)

        def snapshot():
            self.snapshots[name] = (type(env), env.snapshot(directory), env.instance_id)
            return {"name": name}
        self._submit(request_id, started, snapshot)

    def _on_delete_snapshot(self, request_id: Any, req: schemas.DeleteSnapshot) -> None:
        name = req.name
        if name not in self.snapshots:
            raise ServiceError("not_found", f"no snapshot {name!r} on agent {self.agent_id}")
        cls, handle, _ = self.snapshots.pop(name)
        self.pool.submit(self._answer, request_id, lambda: cls.drop_snapshot(handle))

    def _on_execute(self, request_id: Any, req: schemas.AgentExecute) -> None:
        env, started = self._instance(req.instance_id)
        args = (req.command, req.timeout, req.cwd, req.env, req.output_limit)
        if req.stream:  # only a command the loop drives streams: let a start that just answered settle
            wait([started], timeout=START_SETTLE_S)
        if started.done() and started.exception() is None:
            try:
                command = env.spawn(*args)
            except OSError as exc:
                raise ServiceError("environment_error", f"cannot start the command: {exc}") from exc
            if command is not None:
                self._watch(request_id, command)
                self._follow(request_id, req.stream, command)
                return
        self._submit(request_id, started, env.execute, *args)

    # -- commands driven by the loop ---------------------------------------------

    def _on_command_fd(self, fd):
        request_id = self.command_fds[fd]
        command = self.commands[request_id]
        if command.on_readable(fd):
            self._unwatch(fd)
        if command.done:
            self._finish_command(request_id)

    def _expire_commands(self):
        now = time.monotonic()
        for request_id, command in list(self.commands.items()):
            if now >= command.deadline:
                command.on_deadline()
                if command.done:
                    self._finish_command(request_id)

    def _unwatch(self, fd):
        if self.command_fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _finish_command(self, request_id):
        command = self.commands.pop(request_id)
        for fd in command.fds:
            self._unwatch(fd)
        tail = self.streams.pop(request_id, None)
        if tail is not None:  # a file's last bytes are taken before result() removes it...
            self._pump(request_id, tail, everything=True)
        if isinstance(request_id, tuple):  # a session's bash, which no request waits for
            self._session_shell_ended(request_id[1], command)
            return
        try:
            msg = protocol.reply(request_id, command.result())
        except ServiceError as exc:
            msg = protocol.error(request_id, exc.code, exc.message)
        except OSError as exc:
            msg = protocol.error(request_id, "environment_error", f"command failed: {exc}")
        if tail is not None:  # ...and a pipe's once result() has drained it
            self._pump(request_id, tail, everything=True)
            tail.close()
        self._send(msg)
        command.answered()

    def _on_write_file(self, request_id: Any, req: schemas.WriteFile) -> None:
        env, started = self._instance(req.instance_id)
        content = req.content.encode() if isinstance(req.content, str) else req.content
        self._submit(request_id, started, env.write_file, req.path, content, req.mode)

    def _on_read_file(self, request_id: Any, req: schemas.ReadFile) -> None:
        env, started = self._instance(req.instance_id)
        self._submit(request_id, started, env.read_file, req.path, req.limit)

    def _on_close_instance(self, request_id: Any, req: schemas.CloseInstance) -> None:
        env, started = self._instance(req.instance_id)
        del self.envs[env.instance_id]
        self._close_sessions(env.instance_id)
        self._submit(request_id, started, env.close)

    # -- streamed output ----------------------------------------------------------

    def _follow(self, request_id: Any, stream: bool, command: Watched) -> None:
        if stream:
            tail = streams.tail_of(command)
            if tail is not None:
                self.streams[request_id] = tail

    def _pump_streams(self):
        for request_id, tail in list(self.streams.items()):
            self._pump(request_id, tail)

    def _pump(self, request_id, tail, everything=False):
        while True:
            data = tail.take()
            for chunk in streams.chunks(data):
                self._send({"v": protocol.VERSION, "type": protocol.CHUNK, "id": request_id, "data": chunk})
            if not everything or not data:
                break

    # -- sessions: a bash per session, driven by the loop as commands are ------------

    def _watch(self, request_id, command):
        self.commands[request_id] = command
        for fd in command.fds:
            self.command_fds[fd] = request_id
            self.poller.register(fd, zmq.POLLIN)

    def _session_table(self, instance_id: str) -> "tuple[Environment, session.SessionTable]":
        env, started = self._instance(instance_id)
        # The start's answer goes out just before its future is marked done: a client may be that quick.
        wait([started], timeout=START_SETTLE_S)
        if not started.done() or started.exception() is not None:
            raise ServiceError("conflict", f"instance {env.instance_id} has not started")
        table = self.sessions.get(env.instance_id)
        if table is None:
            table = self.sessions[env.instance_id] = session.SessionTable(env)
        return env, table

    def _on_create_session(self, request_id: Any, req: schemas.CreateSession) -> None:
        env, table = self._session_table(req.instance_id)
        shell = session.check_shell(req.shell or "bash")
        new = table.create(req.session)
        try:
            # Its own output is what bash says outside commands (they write to files): the spec's limit.
            watch: Watched | OSError | None = env.spawn(new.launcher(shell), protocol.MAX_SECONDS, None, None,
                                                       env.config["output_limit"])
        except OSError as exc:
            watch = exc
        if not isinstance(watch, Watched):
            new.close_fds()
            table.remove(new)
            raise ServiceError("environment_error", f"cannot start the session's bash: {watch or 'no exec helper'}")
        new.shell_watch = watch
        self._watch(("session", new), watch)
        step = new.running = session.SessionStep(new, session.START_TIMEOUT_S, starting=True)
        self._watch(request_id, step)

    def _on_run_in_session(self, request_id: Any, req: schemas.AgentRunInSession) -> None:
        _, table = self._session_table(req.instance_id)
        found = table.get(req.session)
        if found.ended is not None:
            raise ServiceError("conflict", f"session {found.name!r} has ended: {found.ended}")
        if found.running is not None:
            raise ServiceError("conflict", f"session {found.name!r} is running a command (one at a time)")
        step = found.start_command(req.command, req.timeout, req.output_limit)
        self._watch(request_id, step)
        self._follow(request_id, req.stream, step)

    def _on_close_session(self, request_id: Any, req: schemas.CloseSession) -> None:
        _, table = self._session_table(req.instance_id)
        found = table.get(req.session)
        table.remove(found)
        self._end_session(found, "the session was closed")
        self._send(protocol.reply(request_id, {"session": found.name, "closed": True}))

    def _end_session(self, found, why):
        """Kill a session's bash; answer the command in flight, if any."""
        running = found.running
        session.end(found, why)
        if running is not None:
            request_id = next((rid for rid, command in self.commands.items() if command is running), None)
            if request_id is not None:
                self._finish_command(request_id)

    def _close_sessions(self, instance_id):
        table = self.sessions.pop(instance_id, None)
        if table is None:
            return
        for found in list(table.sessions.values()):
            self._end_session(found, "its instance was closed")
        table.close_all()

    def _session_shell_ended(self, found, watch):
        """A session's bash ended: it says so to the command in flight, and its files go."""
        try:
            watch.result()
        except (ServiceError, OSError):
            pass  # its instance is gone: its output says nothing the session does not
        if found.running is not None:  # bash's last words (`x` after `exit N`) may not have been read yet
            found.running.on_readable(found.status_fd)
            if found.running.done:
                request_id = next((rid for rid, command in self.commands.items() if command is found.running), None)
                if request_id is not None:
                    self._finish_command(request_id)
        self._end_session(found, found.ended or "the session's bash was killed")
        found.close_fds()
        found.remove_files()

    def _instance(self, instance_id: str) -> "tuple[Environment, Future[Any]]":
        if instance_id not in self.envs:
            raise ServiceError("not_found", f"no instance {instance_id} on agent {self.agent_id}")
        return self.envs[instance_id]

    def _submit(self, request_id, started, fn, *args):
        """Run fn on the pool once the instance has started, and answer the request with its result."""
        def job():
            started.result()
            return fn(*args)
        self.pool.submit(self._answer, request_id, job)

    def _start(self, request_id, env):
        def start():
            try:
                env.info = env.start()
                return {"instance_id": env.instance_id, "info": env.info}
            except BaseException:
                env.close()
                raise
        if not self._answer(request_id, start, drop_on_error=env.instance_id):
            raise RuntimeError("start failed")  # fails the work queued behind this start

    def _answer(self, request_id, job, drop_on_error=""):
        """Run job on this worker thread and post its answer (or its error) to the loop; True if it succeeded."""
        drop = ""
        try:
            result = job()
            msg = protocol.reply(request_id, {} if result is None else result)
        except ServiceError as exc:
            msg = protocol.error(request_id, exc.code, exc.message)
        except FileNotFoundError as exc:
            msg = protocol.error(request_id, "not_found", f"no such file: {exc.filename}")
        except (IsADirectoryError, NotADirectoryError) as exc:
            msg = protocol.error(request_id, "invalid_request", str(exc))
        except Exception as exc:
            log.error("request_failed", request=request_id, error=repr(exc))
            msg = protocol.error(request_id, "environment_error", f"{exc.__class__.__name__}: {exc}")
        if msg["type"] == protocol.ERROR:
            drop = drop_on_error
        sock = getattr(self._outbox_sockets, "sock", None)
        if sock is None:
            sock = self._outbox_sockets.sock = self.ctx.socket(zmq.PUSH)
            sock.connect(self.outbox_address)
        sock.send_multipart([protocol.encode(msg), drop.encode()], copy=False)
        return not drop_on_error or not drop

    def _forward_answer(self, frames: list[zmq.Frame]) -> None:
        payload, drop = frames
        for instance_id in drop.bytes.decode().split():  # what a failed start or fork would have made
            self.envs.pop(instance_id, None)
        self._send_frame(payload.buffer)  # the worker's frame itself, not a copy

    def _close_all(self):
        """Close every instance in parallel, then reap once more, all within stop_timeout_s.

        The reap at start misses what a dead agent's engine made after it (a container whose create
        was under way as its agent was SIGKILLed, or that an engine restarting kept from the reap):
        with no later agent on the host, nothing else would remove it."""
        deadline = time.monotonic() + self.stop_timeout_s
        envs = list(self.envs.values())
        self.envs.clear()
        if envs:
            log.info("closing_instances", agent=self.agent_id, count=len(envs))
            _, pending = wait([self.pool.submit(_close_quietly, env, started) for env, started in envs],
                              timeout=self.stop_timeout_s)
            if pending:
                log.error("close_timed_out", agent=self.agent_id, count=len(pending))
        if not wait([self.pool.submit(self._reap_leftovers)], timeout=max(0.0, deadline - time.monotonic()))[0]:
            log.warning("reap_timed_out", agent=self.agent_id)


# The requests the broker passes on to agents, each with its one handler.
REQUEST_HANDLERS: dict[str, Callable[[Agent, Any, Any], None]] = {  # (agent, request id, its model)
    protocol.START_INSTANCE: Agent._on_start_instance,
    protocol.EXECUTE: Agent._on_execute,
    protocol.CLOSE_INSTANCE: Agent._on_close_instance,
    protocol.WRITE_FILE: Agent._on_write_file,
    protocol.READ_FILE: Agent._on_read_file,
    protocol.FORK_INSTANCE: Agent._on_fork_instance,
    protocol.SNAPSHOT_INSTANCE: Agent._on_snapshot_instance,
    protocol.DELETE_SNAPSHOT: Agent._on_delete_snapshot,
    protocol.CREATE_SESSION: Agent._on_create_session,
    protocol.RUN_IN_SESSION: Agent._on_run_in_session,
    protocol.CLOSE_SESSION: Agent._on_close_session,
}


def kill_orphans(host: str) -> list[int]:
    """SIGKILL the processes that agents of this host started and outlived them; return their pids."""
    killed = []
    for pid, mark in marked_processes(f"{AGENT_MARK}={host}-".encode()):
        try:
            agent_pid = int(mark.decode(errors="replace").rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not workdirs.alive(agent_pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def raise_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every command and container costs descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("file_limit_raised", soft=soft, to=hard)


def _close_quietly(env, started=None):
    """Close env, after its start if one is given: a close during the start misses what the start
    makes after it (a container created a moment later was left behind)."""
    if started is not None:
        wait([started])
    try:
        env.close()
    except Exception as exc:
        log.error("close_failed", instance=env.instance_id, error=repr(exc))

