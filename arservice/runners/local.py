"""Agents as child processes of this host, restarted if they die, stopped with the service.

Agents register with a secret: the service's token (which also keys their CURVE handshake), or
else one made for this run. It reaches them in their environment (readable only by this user),
never on a command line, so another local process cannot register as an agent and receive
clients' commands.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import zmq

from ..agent import workdirs
from ..logs import EventLog
from .base import BaseRunner

log = EventLog("runner.local")

STOP_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 30.0)
# An agent that ran this long was healthy: its slot's next restart starts from the shortest backoff.
HEALTHY_S = 10.0
# What an agent could take a secret from: only the one given here may reach it.
SECRET_VARIABLES = ("ARSERVICE_TOKEN", "ARSERVICE_TOKEN_FILE", "ARSERVICE_AGENT_SECRET", "ARSERVICE_AGENT_SECRET_FILE")


class LocalRunner(BaseRunner):
    name = "local"

    def __init__(self, limits: dict[str, Any], broker_address: str, token: str | None = None,
                 context: zmq.Context | None = None, agents: int = 1, agent_secret: str | None = None,
                 log_level: str = "INFO") -> None:
        super().__init__(limits, broker_address, token, context)
        self.agent_secret = agent_secret  # without a token: made for this run, given only to our agents
        self.count = agents
        instances = limits.get("instances", 10)
        # Split the service's instances over the agents; the broker enforces the total anyway.
        self.per_agent = max(1, -(-instances // agents))
        # Its agents keep their directories under workdirs.DEFAULT_ROOT, which stop() reaps.
        self.agent_args = ["--log-level", log_level]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * agents
        self.spawned_at = [0.0] * agents
        self.backoff = [RESTART_BACKOFF_S[0]] * agents
        self.thread = threading.Thread(target=self._watch, name="runner", daemon=True)

    def _spawn(self, slot):
        argv = [sys.executable, "-m", "arservice", "agent", "--broker", self.broker_address,
                "--instances", str(self.per_agent), *self.agent_args]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
        if self.token:
            env["ARSERVICE_TOKEN"] = self.token
        elif self.agent_secret:
            env["ARSERVICE_AGENT_SECRET"] = self.agent_secret
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        self.procs[slot] = proc
        self.spawned_at[slot] = time.monotonic()
        log.info("agent_spawned", slot=slot, pid=proc.pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self.requested = self.count
        self.thread.start()

    def _watch(self):
        while not self.stopping.wait(0.5):
            for slot, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.stopping.is_set():
                    if time.monotonic() - self.spawned_at[slot] >= HEALTHY_S:
                        self.backoff[slot] = RESTART_BACKOFF_S[0]
                    backoff = self.backoff[slot]
                    log.warning("agent_died", slot=slot, pid=proc.pid, returncode=proc.returncode, restart_in_s=backoff)
                    if self.stopping.wait(backoff):
                        return
                    self._spawn(slot)
                    self.backoff[slot] = min(backoff * 2, RESTART_BACKOFF_S[1])

    def stop(self) -> None:
        """SIGTERM every agent (they close their instances), SIGKILL what is left after a while."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("agent_kill", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                proc.wait()
        workdirs.reap(workdirs.DEFAULT_ROOT)
        log.info("runner_stopped", agents=len(live))
