"""HTTP front-end worker processes: the same app, off the broker's interpreter.

In-process, every HTTP request costs the broker's process its JSON, Falcon and waitress work
under the one interpreter lock the broker loop also needs. With `--http-workers N` the parent
binds the HTTP port once and starts N processes that inherit that listening socket (the kernel
hands each connection to one of them) and reach the broker as ZMQ clients over loopback, with
the server's token in their environment (never on a command line). The app, its middleware,
limits and routes are the ones the in-process server runs.
"""

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import zmq

from .. import allocator, logs
from ..client import LINK_SOCKETS
from ..logs import EventLog
from ..signals import on_signals, wait_until
from .app import HTTPServer, create_app

log = EventLog("http.workers")

# What a worker reads from its environment (the token among them, so it is on no argv).
ENV_FD = "ARSERVICE_HTTP_FD"
ENV_BROKER = "ARSERVICE_HTTP_BROKER"
ENV_TOKEN = "ARSERVICE_TOKEN"
ENV_SETTINGS = "ARSERVICE_HTTP_SETTINGS"  # threads,connections,idle_timeout_s,max_body
ENV_LOG_LEVEL = "ARSERVICE_HTTP_LOG_LEVEL"
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1


def listen(host: str, port: int) -> socket.socket:
    """The HTTP port, bound and listening in the parent, for the workers to inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class WorkerPool:
    """N worker processes serving one listening socket; started and stopped by the service."""

    def __init__(self, count: int, host: str, port: int, broker_address: str, token: str | None,
                 threads: int, connections: int, idle_timeout_s: float, max_body: int, log_level: str = "INFO") -> None:
        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        self.count = count
        self.env = {k: v for k, v in os.environ.items() if k not in (ENV_TOKEN, "ARSERVICE_TOKEN_FILE")}
        self.env.update({ENV_FD: str(self.sock.fileno()), ENV_BROKER: broker_address,
                         ENV_SETTINGS: f"{threads},{connections},{idle_timeout_s},{max_body}",
                         ENV_LOG_LEVEL: log_level})
        if token:
            self.env[ENV_TOKEN] = token
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for _ in range(self.count):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "arservice.http.workers"], env=self.env,
                                               stdin=subprocess.DEVNULL, pass_fds=(self.sock.fileno(),)))
        log.info("http_started", port=self.port, workers=self.count, pids=",".join(str(p.pid) for p in self.procs))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("http_worker_kill", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                proc.wait()
        self.sock.close()


def _die_with_parent() -> None:
    """A worker outlives no service: the kernel sends it SIGTERM when its parent ends."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(0)


def main() -> None:
    logs.setup(os.environ[ENV_LOG_LEVEL])
    allocator.return_large_blocks()
    _die_with_parent()
    sock = socket.socket(fileno=int(os.environ[ENV_FD]))
    threads, connections, idle_timeout_s, max_body = os.environ[ENV_SETTINGS].split(",")
    token = os.environ.get(ENV_TOKEN) or None
    context: zmq.Context = zmq.Context.instance()
    # Each waitress thread that serves a request keeps its own link to the broker. Counting one
    # socket per thread, the 513th thread's link failed (EMFILE: libzmq's socket limit) and every
    # request that thread served was a 500.
    context.set(zmq.MAX_SOCKETS, LINK_SOCKETS * int(threads) + 1024)
    app = create_app(context, token, int(max_body), broker_address=os.environ[ENV_BROKER])
    server = HTTPServer(app, threads=int(threads), max_body=int(max_body), connections=int(connections),
                        idle_timeout_s=float(idle_timeout_s), sockets=[sock])
    stopped = threading.Event()
    on_signals(stopped.set)
    server.start()
    wait_until(stopped)
    server.stop()
    # Not a normal exit: it would join waitress's threads, and one may wait on a long command.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
