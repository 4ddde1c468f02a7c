"""A command through arservice behaves as `bash -c COMMAND 2>&1 </dev/null` would, and no command
kills its instance.

The differential test runs every command of fidelity_corpus.py through a backend (in this
process, as an agent drives it) and raw beside it: host `bash -c` for local, `docker exec` /
`podman exec` in the same container, a raw `bwrap ... bash -c` with the same sandbox options.
"""

import re
import subprocess
import tempfile
import uuid

import pytest

from arservice.environments import backend
from arservice.environments.base import shell_argv
from arservice.environments.process import shell_status

from backends import SPECS, params
from fidelity_corpus import CORPUS

TIMEOUT_S = 20.0
BASH_SPECS = ("local", "docker-bookworm", "podman-bookworm", "bubblewrap", "bubblewrap-rootfs")
NAMESPACED = ("docker-bookworm", "podman-bookworm", "bubblewrap", "bubblewrap-rootfs")


def without_pids(output):
    """bash reports a job a signal killed with its pid (`line 1:  3885 Killed  sleep 5`): the one
    part of an answer that differs from run to run."""
    return re.sub(rb"(line \d+:) +\d+ ", rb"\1 PID ", output)


class Pair:
    """One backend instance, and the raw tool that runs a command beside it."""

    def __init__(self, name, spec, workdir_root):
        cls = backend(spec["type"])
        self.name = name
        self.env = cls(f"i-{uuid.uuid4().hex[:12]}", cls.parse_config(spec), "fidelity", workdir_root)
        self.env.start()
        self.shell = self.env.shell

    def ours(self, command):
        result = self.env.execute(command, TIMEOUT_S)
        return without_pids(result["output"]), result["returncode"]

    def raw(self, command):
        argv = shell_argv(self.shell, command)
        kind = self.env.type
        if kind in ("docker", "podman"):
            # sh execs the shell, so its pid, parent and $0 are what `docker exec C bash -c` gives.
            exit_code, output = self.env.container.exec_run(["sh", "-c", 'exec "$@" </dev/null 2>&1', "sh", *argv])
            return without_pids(output), exit_code
        if kind == "bubblewrap":
            argv = [*self.env.prefix, "--chdir", self.env.cwd, *argv]
        local = kind == "local"
        # Its own session: `kill 0` in a command must not reach pytest.
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=self.env.cwd if local else None, env=self.env.env if local else None,
                              start_new_session=True, timeout=TIMEOUT_S)
        return without_pids(done.stdout), shell_status(done.returncode)

    def close(self):
        self.env.close()


@pytest.fixture(scope="module")
def workdir_root():
    with tempfile.TemporaryDirectory(prefix="arservice-fidelity-") as root:
        yield root


@pytest.fixture(scope="module", params=params(*BASH_SPECS))
def pair(request, workdir_root):
    pair = Pair(request.param, SPECS[request.param], workdir_root)
    yield pair
    pair.close()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 150 and len(set(CORPUS)) == len(CORPUS)


def test_every_command_behaves_as_bash_c(pair):
    differences = []
    for command in CORPUS:
        ours, raw = pair.ours(command), pair.raw(command)
        if ours != raw:  # once more: podman exec now and then loses an exec's output
            raw = pair.raw(command)
        if ours != raw:
            differences.append(f"{command!r}\n   ours: {ours!r:.300}\n   raw:  {raw!r:.300}")
    assert not differences, f"{len(differences)} of {len(CORPUS)} differ on {pair.name}:\n" + "\n".join(differences)
