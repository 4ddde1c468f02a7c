"""Where the Slurm runner's commands run: on this host, or on a login node over SSH (paramiko).

Both shells answer `run(argv)` with (returncode, stdout, stderr) and `write(path, data, mode)`.
Over SSH a lost connection is reopened with backoff; failed authentication is reported at once
(retrying cannot fix a wrong key).
"""

import os
import shlex
import socket
import subprocess
import time
from collections import namedtuple

from ..logs import EventLog

log = EventLog("runner.shell")

Result = namedtuple("Result", "returncode stdout stderr")
SSH_RETRY_BACKOFF_S = (0.5, 8.0)
SSH_RETRIES = 5


class ShellError(RuntimeError):
    pass


class LocalShell:
    description = "this host"

    def run(self, argv, timeout=60.0):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise ShellError(f"{argv[0]} is not installed on {self.description}") from None
        except subprocess.TimeoutExpired:
            raise ShellError(f"{shlex.join(argv)} did not finish within {timeout:g}s") from None
        return Result(done.returncode, done.stdout, done.stderr)

    def write(self, path, data, mode):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)

    def close(self):
        pass


class SSHShell:
    """Commands on `user@host` (port, key file). Unknown host keys are accepted with a warning,
    as the first `ssh` to a login node would ask; known ones are checked against ~/.ssh/known_hosts."""

    def __init__(self, target, port=22, key_file=None, connect_timeout_s=10.0):
        user, _, host = target.rpartition("@")
        self.user, self.host, self.port = user or None, host, port
        self.key_file = key_file
        self.connect_timeout_s = connect_timeout_s
        self.description = f"{target}:{port}"
        self._client = None

    def connect(self):
        import paramiko
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.WarningPolicy())
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key_file,
                           timeout=self.connect_timeout_s, banner_timeout=self.connect_timeout_s,
                           auth_timeout=self.connect_timeout_s,
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

    def _retrying(self, what, action):
        import paramiko
        backoff = SSH_RETRY_BACKOFF_S[0]
        for attempt in range(SSH_RETRIES + 1):
            try:
                return action(self._client or self.connect())
            except (ConnectionError, paramiko.SSHException, EOFError, socket.error) as exc:
                if isinstance(exc, paramiko.AuthenticationException):
                    raise ShellError(f"ssh {self.description}: authentication failed: {exc}") from None
                self.close()
                if attempt == SSH_RETRIES:
                    raise ShellError(f"ssh {self.description}: {what} failed after {attempt + 1} attempts: {exc}") from None
                log.warning("ssh_retry", target=self.description, what=what, attempt=attempt + 1, wait_s=backoff, error=str(exc))
                time.sleep(backoff)
                backoff = min(backoff * 2, SSH_RETRY_BACKOFF_S[1])

    def run(self, argv, timeout=60.0):
        def action(client):
            _, stdout, stderr = client.exec_command(shlex.join(argv), timeout=timeout)
            out, err = stdout.read(), stderr.read()
            return Result(stdout.channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace"))
        return self._retrying(argv[0], action)

    def write(self, path, data, mode):
        def action(client):
            self.run(["mkdir", "-p", os.path.dirname(path) or "."])
            with client.open_sftp() as sftp, sftp.open(path, "wb") as f:
                f.chmod(mode)  # before the data: a secret is never readable by others
                f.write(data)
        return self._retrying(f"write {path}", action)

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None
