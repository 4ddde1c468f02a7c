"""Where the Slurm runner's commands run: on this host, or on a login node over SSH (paramiko).

Both shells answer `run(argv, timeout)` with (returncode, stdout, stderr) and `write(path, data, mode)`.
Every call is bounded: past its timeout, or once `abort` is set (a second Ctrl-C), it raises
ShellError instead of waiting on an unreachable login node or a hung Slurm command. Over SSH a lost
connection is reopened with backoff within that bound; failed authentication is reported at once
(retrying cannot fix a wrong key).
"""

import os
import secrets
import shlex
import socket
import subprocess
import threading
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any

from ..logs import EventLog

if TYPE_CHECKING:
    import paramiko

log = EventLog("runner.shell")

Result = namedtuple("Result", "returncode stdout stderr")
COMMAND_TIMEOUT_S = 30.0  # any one Slurm or SSH command, unless the runner says otherwise
SSH_RETRY_BACKOFF_S = (0.5, 8.0)
WAIT_SLICE_S = 0.05  # how often a wait looks at `abort`


class ShellError(RuntimeError):
    pass


class LocalShell:
    description = "this host"

    def __init__(self, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.abort = threading.Event()

    def run(self, argv: list[str], timeout: float | None = None) -> Result:
        timeout = timeout or self.timeout_s
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise ShellError(f"{argv[0]} is not installed on {self.description}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                out, err = proc.communicate(timeout=WAIT_SLICE_S)
                return Result(proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                if self.abort.is_set() or time.monotonic() >= deadline:
                    proc.kill()
                    proc.communicate()
                    why = "was abandoned (stop forced)" if self.abort.is_set() else f"did not finish within {timeout:g}s"
                    raise ShellError(f"{shlex.join(argv)} {why}") from None

    def write(self, path: str, data: bytes, mode: int) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)

    def close(self) -> None:
        pass


class SSHShell:
    """Commands on `user@host` (port, key file). Unknown host keys are accepted with a warning,
    as the first `ssh` to a login node would ask; known ones are checked against ~/.ssh/known_hosts.

    paramiko blocks without a bound in places (a channel request on a connection whose peer fell
    silent waits for TCP to give up, minutes later), so each call runs on a helper thread and is
    waited for with a deadline; past it the connection is closed, which ends the helper too."""

    def __init__(self, target: str, port: int = 22, key_file: str | None = None, connect_timeout_s: float = 10.0,
                 timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        user, _, host = target.rpartition("@")
        self.user, self.host, self.port = user or None, host, port
        self.key_file = key_file
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.description = f"{target}:{port}"
        self.abort = threading.Event()
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()  # one connection, opened once even when two threads need it
        self._sh: RemoteSh | None = None  # the RemoteSh on that connection
        self._sh_lock = threading.Lock()  # one command at a time through it

    def connect(self, timeout: float | None = None) -> "paramiko.SSHClient":
        import paramiko
        timeout = min(self.connect_timeout_s, timeout or self.connect_timeout_s)
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.WarningPolicy())
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key_file,
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           # With an explicit key use only that key, so a wrong one fails instead of another one working.
                           look_for_keys=self.key_file is None, allow_agent=self.key_file is None)
        except paramiko.AuthenticationException as exc:
            client.close()
            key = f" with key {self.key_file}" if self.key_file else ""
            raise ShellError(f"ssh {self.description}: authentication failed{key}: {exc}") from None
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            raise ConnectionError(f"ssh {self.description}: {exc}") from None
        self._client = client
        return client

    def _client_within(self, timeout: float):
        with self._lock:
            return self._client or self.connect(timeout)

    def _call(self, action, deadline: float, box: dict, done: threading.Event) -> None:
        """The helper thread's part: action's result or exception into `box`, then `done`."""
        try:
            box["result"] = action(self._client_within(deadline - time.monotonic()), deadline - time.monotonic())
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, which decides
            box["error"] = exc
        done.set()

    def _bounded(self, what: str, action, timeout: float):
        """action(client) on a helper thread, reconnecting with backoff, all within `timeout`."""
        import paramiko
        deadline = time.monotonic() + timeout
        backoff = SSH_RETRY_BACKOFF_S[0]
        attempt = 0
        while True:
            attempt += 1
            box: dict[str, Any]
            box, done = {}, threading.Event()
            threading.Thread(target=self._call, args=(action, deadline, box, done), name=f"ssh-{what}", daemon=True).start()
            while not done.wait(WAIT_SLICE_S):
                if self.abort.is_set() or time.monotonic() >= deadline:
                    self.close()  # unblocks the helper thread, which then ends on its own
                    why = "abandoned (stop forced)" if self.abort.is_set() else f"no answer within {timeout:g}s"
                    raise ShellError(f"ssh {self.description}: {what}: {why}")
            error = box.get("error")
            if error is None:
                return box["result"]
            if isinstance(error, ShellError):
                raise error
            if isinstance(error, paramiko.AuthenticationException):
                raise ShellError(f"ssh {self.description}: authentication failed: {error}") from None
            if not isinstance(error, (ConnectionError, paramiko.SSHException, EOFError, socket.error)):
                raise error
            self.close()
            left = deadline - time.monotonic()
            if left <= backoff or self.abort.is_set():
                raise ShellError(f"ssh {self.description}: {what} failed after {attempt} attempt(s) "
                                 f"within {timeout:g}s: {error}") from None
            log.warning("ssh_retry", target=self.description, what=what, attempt=attempt, wait_s=backoff, error=str(error))
            self.abort.wait(backoff)
            backoff = min(backoff * 2, SSH_RETRY_BACKOFF_S[1])

    def run(self, argv: list[str], timeout: float | None = None) -> Result:
        def action(client, left):
            with self._sh_lock:
                if self._sh is None or self._sh.client is not client:
                    self._sh = RemoteSh(client, left)
                return self._sh.run(shlex.join(argv))
        return self._bounded(argv[0], action, timeout or self.timeout_s)

    def write(self, path: str, data: bytes, mode: int) -> None:
        def action(client, left):
            _, stdout, _ = client.exec_command(shlex.join(["mkdir", "-p", os.path.dirname(path) or "."]), timeout=max(left, 0.1))
            stdout.channel.recv_exit_status()
            with client.open_sftp() as sftp, sftp.open(path, "wb") as f:
                f.chmod(mode)  # before the data: a secret is never readable by others
                f.write(data)
        return self._bounded(f"write {path}", action, self.timeout_s)

    def close(self) -> None:
        client, self._client = self._client, None
        self._sh = None
        if client is not None:
            client.close()


class RemoteSh:
    """One /bin/sh on the login node that reads commands on its stdin. A channel per command would
    run the login shell's start-up files every time (sshd runs commands through it; a module
    system or pyenv there costs 0.3 s and a burst of processes per call on this machine); this
    pays them once per connection. Each command's stdin is /dev/null, so it cannot eat the ones
    after it; its stdout, exit status and stderr come back framed by a marker it cannot guess."""

    def __init__(self, client: "paramiko.SSHClient", timeout: float) -> None:
        self.client = client
        self.marker = f"__arservice_{secrets.token_hex(8)}__".encode()
        self.channel = client.get_transport().open_session(timeout=timeout)  # type: ignore[union-attr]  # connected
        self.channel.exec_command("exec /bin/sh")
        self.buffer = b""
        self.run("true")  # whatever the start-up files printed goes with this one

    def run(self, command: str) -> Result:
        marker = self.marker.decode()
        self.channel.sendall(
            f"{{ __e=$( {{ {command}\n}} 2>&1 1>&3 3>&- ); __s=$?; }} 3>&1 </dev/null\n"
            f"printf '\\n%s %s %s\\n' {marker} \"$__s\" \"$(printf %s \"$__e\" | wc -c)\"; printf %s \"$__e\"\n".encode())
        out = self._until(b"\n" + self.marker + b" ")
        status, size = self._until(b"\n").split()
        while len(self.buffer) < int(size):
            self._receive()
        err, self.buffer = self.buffer[:int(size)], self.buffer[int(size):]
        return Result(int(status), out.decode(errors="replace"), err.decode(errors="replace"))

    def _until(self, token: bytes) -> bytes:
        while token not in self.buffer:
            self._receive()
        head, _, self.buffer = self.buffer.partition(token)
        return head

    def _receive(self) -> None:
        data = self.channel.recv(65536)
        if not data:
            raise EOFError("the shell on the login node ended")
        self.buffer += data
