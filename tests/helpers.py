"""Start the real `arservice` command for a test, and wait on conditions with deadlines."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from arservice import protocol
from arservice.client import HTTPClient, ZMQClient


def free_ports(count):
    """`count` distinct ports free now (each socket stays bound until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port():
    return free_ports(1)[0]


def wait_for(condition, timeout=10.0, interval=0.02, what="condition"):
    """Poll condition() until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_in_threads(target, count):
    """Call target(i) for i in range(count), each on its own thread; return when all are done."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def proc_stat(pid):
    """(command name, state letter, parent pid) of a process, from /proc/PID/stat; None once it is
    gone. The state is b"Z" for a zombie, b"T" for a stopped process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            head, rest = f.read().rsplit(b")", 1)
    except OSError:
        return None
    fields = rest.split()
    return head.split(b"(", 1)[1].decode(errors="replace"), fields[0], int(fields[1])


def parent(pid):
    """The parent's pid of a process, None once it is gone."""
    stat = proc_stat(pid)
    return None if stat is None else stat[2]


def alive(pid):
    """Whether the process runs: neither gone nor a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != b"Z"


def proc_status(pid, field):
    """The value of one field of /proc/PID/status (VmRSS, VmHWM, NSpid, ...), as written there."""
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field + ":"))


def peak_rss_mib(pid):
    """The most memory the process has held (VmHWM), in MiB."""
    return int(proc_status(pid, "VmHWM").split()[0]) / 1024


def live_processes(marker):
    """Pids of live (non-zombie) processes whose command line contains marker."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline and alive(pid):
            found.append(int(pid))
    return found


class Service:
    """`arservice --runner local ...` as a subprocess on free ports."""

    def __init__(self, *args, token=None, env=None):
        self.http_port, self.zmq_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.zmq = f"tcp://127.0.0.1:{self.zmq_port}"
        self.token = token
        self.log = tempfile.NamedTemporaryFile(prefix="arservice-test-", suffix=".log", delete=False)
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("ARSERVICE_TOKEN", None)
        if token:
            full_env["ARSERVICE_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arservice", *args, "--port", str(self.http_port), "--zmq-port", str(self.zmq_port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
        )
        self.http = HTTPClient(self.url, token=token or "")
        self.client = ZMQClient(self.zmq, token=token or "")

    def output(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_ready(self, agents=1, timeout=30):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"arservice exited with {self.proc.returncode}:\n{self.output()}")
            return "arservice ready" in self.output() and len(self.client.available_resources()["agents"]) >= agents
        try:
            wait_for(ready, timeout, what=f"{agents} agent(s) registered")
        except BaseException:
            self.stop()  # a service that never became ready must not outlive the test
            raise
        return self

    def agent_pids(self):
        pids = [a["pid"] for a in self.client.available_resources()["agents"]]
        assert all(parent(p) == self.proc.pid for p in pids), "an agent that is not the service's child"
        return pids

    def stop(self, sig=signal.SIGTERM, timeout=40):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"arservice did not stop within {timeout}s:\n{self.output()}") from None
        self.client.close()
        os.unlink(self.log.name)
        return self.proc.returncode


class PlayedBroker:
    """A real agent process (`arservice agent ...`) whose broker is a ROUTER played by the test:
    the agent is registered on start, and `answer_to(frame)` sends it a raw frame and returns its
    first answer that is not a heartbeat."""

    def __init__(self, *agent_args):
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = free_port()
        self.router.bind(f"tcp://127.0.0.1:{port}")
        self.agent = subprocess.Popen([sys.executable, "-m", "arservice", "agent", "--broker", f"tcp://127.0.0.1:{port}",
                                       *agent_args], stderr=subprocess.DEVNULL)
        try:
            self.identity, msg = self.receive()
            assert msg["type"] == "register", msg
            self.router.send_multipart([self.identity, protocol.encode(protocol.reply(msg["id"], {"registered": True}))])
        except BaseException:
            self.close()
            raise

    def receive(self):
        assert self.router.poll(15000), "the agent said nothing"
        identity, frame = self.router.recv_multipart()
        return identity, protocol.decode(frame)

    def send(self, frame):
        self.router.send_multipart([self.identity, frame])

    def answer_to(self, frame):
        self.send(frame)
        while True:
            _, reply = self.receive()
            if reply["type"] != "heartbeat":
                return reply

    def close(self):
        """Stop the agent; its exit status."""
        self.agent.terminate()
        try:
            return self.agent.wait(timeout=30)
        finally:
            self.router.close()


# A broker without --token takes only agents that hold its agent secret.
AGENT_SECRET = "played-agent-test-secret"


def secret_file(tmp_path) -> str:
    path = tmp_path / "agent-secret"
    path.write_text(AGENT_SECRET)
    return str(path)


class PlayedAgent:
    """An agent played by the test over a DEALER socket, registered with AGENT_SECRET: it answers
    what the broker forwards when and how the test chooses."""

    def __init__(self, address: str):
        self.agent_id = f"played-{os.getpid()}-{secrets.token_hex(2)}"
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.agent_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, msg: dict) -> None:
        self.sock.send(protocol.encode(msg))

    def register(self) -> None:
        self.send(protocol.request(protocol.REGISTER, "r", agent_id=self.agent_id, capacity={"instances": 2},
                                   env_types=["local"], hostname="played", pid=0, instances=[], secret=AGENT_SECRET))
        assert self.receive(lambda m: m["type"] == protocol.REPLY)["result"]["registered"]

    def receive(self, wanted, timeout: float = 15.0) -> dict:
        """The first message from the broker that wanted() accepts (heartbeats answered on the way)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(left * 1000):
                msg = protocol.decode(self.sock.recv())
                if wanted(msg):
                    return msg
                if msg["type"] == protocol.HEARTBEAT:
                    self.send(protocol.request(protocol.HEARTBEAT, "h", instances=0))
        raise AssertionError("the broker did not send what the test waited for")

    def close(self) -> None:
        self.sock.close()
