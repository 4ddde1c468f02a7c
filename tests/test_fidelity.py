"""A command through arservice behaves as `bash -c COMMAND 2>&1 </dev/null` would, and no command
kills its instance.

The differential test runs every command of fidelity_corpus.py through a backend (in this
process, as an agent drives it) and raw beside it: host `bash -c` for local, `docker exec` /
`podman exec` in the same container, a raw `bwrap ... bash -c` with the same sandbox options.
"""

import os
import re
import resource
import signal
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.environments import backend, spare
from arservice.environments.base import shell_argv
from arservice.environments.helper import SHELL_VARIABLES
from arservice.environments.process import shell_status
from arservice.protocol import ServiceError

from backends import SPECS, params
from fidelity_corpus import CORPUS
from helpers import wait_for

TIMEOUT_S = 20.0
BASH_SPECS = ("local", "local-fast", "docker-bookworm", "podman-bookworm", "bubblewrap", "bubblewrap-rootfs",
              "docker-bookworm-plain-exec", "bubblewrap-per-command")
# A plain docker exec costs ~60 ms a side: the plain docker path runs every fifth command of the
# corpus (the whole of it takes a minute), bubblewrap-per-command the whole.
SAMPLED = {"docker-bookworm-plain-exec": CORPUS[::5]}
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

    def ours(self, command, env=None):
        spares = getattr(self.env, "spares", None)  # local with fast_exec
        if spares is not None:  # the command runs in a spare, not in the direct spawn that stands in for a missing one
            spare.STARTER.submit(lambda: None).result(timeout=10)
            waiting = spares.spare
            assert waiting is not None
        result = self.env.execute(command, TIMEOUT_S, env=env)
        if spares is not None and env is None:
            assert spares.spare is not waiting, f"{command!r} did not run in the spare"
        return without_pids(result["output"]), result["returncode"]

    def raw(self, command, env=None):
        """The command run by the backend's own tool; `env`: variables it passes as given."""
        env = env or {}
        argv = shell_argv(self.shell, command)
        kind = self.env.type
        if kind in ("docker", "podman"):
            # sh execs the shell, so its pid, parent and $0 are what `docker exec C bash -c` gives.
            # Variables go through `env`, after sh: sh would read them (dash resets IFS and PPID,
            # and refuses OPTIND=x), as a `docker exec --env` does not.
            given = ["env", *(f"{name}={value}" for name, value in env.items())] if env else []
            exit_code, output = self.env.container.exec_run(
                ["sh", "-c", 'exec "$@" </dev/null 2>&1', "sh", *given, *argv])
            return without_pids(output), exit_code
        if kind == "bubblewrap":
            argv = [*self.env.prefix, "--chdir", self.env.cwd,
                    *[word for name, value in env.items() for word in ("--setenv", name, value)], *argv]
        local = kind == "local"
        # Its own session: `kill 0` in a command must not reach pytest.
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=self.env.cwd if local else None, env={**self.env.env, **env} if local else None,
                              start_new_session=True, timeout=TIMEOUT_S, check=False)
        return without_pids(done.stdout), shell_status(done.returncode)

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc_info) -> None:
        self.env.close()


@pytest.fixture(scope="module")
def workdir_root():
    with tempfile.TemporaryDirectory(prefix="arservice-fidelity-") as root:
        os.chmod(root, 0o755)  # as an agent's own root: bubblewrap's unprivileged sandbox uid must reach it
        yield root


@pytest.fixture(scope="module", params=params(*BASH_SPECS))
def pair(request, workdir_root):
    with Pair(request.param, SPECS[request.param], workdir_root) as pair:
        yield pair


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 150 and len(set(CORPUS)) == len(CORPUS)


def test_every_command_behaves_as_bash_c(pair):
    differences = []
    corpus = SAMPLED.get(pair.name, CORPUS)
    for command in corpus:
        ours, raw = pair.ours(command), pair.raw(command)
        if ours != raw:  # once more: podman exec now and then loses an exec's output
            raw = pair.raw(command)
        if ours != raw:
            differences.append(f"{command!r}\n   ours: {ours!r:.300}\n   raw:  {raw!r:.300}")
    assert not differences, f"{len(differences)} of {len(corpus)} differ on {pair.name}:\n" + "\n".join(differences)


# Names shells give a meaning to (every one of helper.SHELL_VARIABLES, and bash's that begin with
# BASH or LC_), and plain ones beside them.
VARIABLE_NAMES = [*sorted(SHELL_VARIABLES), "BASH", "BASHOPTS", "BASHPID", "BASH_ALIASES", "BASH_ARGC", "BASH_ARGV",
                  "BASH_ARGV0", "BASH_CMDS", "BASH_COMMAND", "BASH_COMPAT", "BASH_ENV", "BASH_LINENO", "BASH_SOURCE",
                  "BASH_SUBSHELL", "BASH_VERSINFO", "BASH_XTRACEFD", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "CDPATH",
                  "ENV", "HOME", "LANG", "PS4", "TMPDIR", "GREETING"]


def test_variables_reach_the_command_as_given(pair):
    """A command's env is in its shell's environment as given (bash reading it at its start is
    then what `bash -c` does), whatever the name: the command file once exported them from a bash,
    which refused the read-only ones with an error in the output and passed others changed."""
    differences = []
    for name in VARIABLE_NAMES:
        for value in ("5", "a b"):
            command = f"tr '\\0' '\\n' </proc/$$/environ | grep -x '{name}=.*'; echo $?"
            ours, raw = pair.ours(command, {name: value}), pair.raw(command, {name: value})
            if ours != raw:
                differences.append(f"{name}={value!r}\n   ours: {ours!r:.300}\n   raw:  {raw!r:.300}")
    assert not differences, f"{len(differences)} differ on {pair.name}:\n" + "\n".join(differences)


@pytest.mark.parametrize("name", params("docker-bookworm", "podman-bookworm", "docker-bookworm-plain-exec"))
def test_a_path_without_env_in_it_beside_a_shell_variable(name, workdir_root):
    """Such variables go through `env`, found where it was, not in the command's PATH: with no bash
    in that PATH either, the command fails as `docker exec --env` does. (Not on local or bubblewrap,
    whose own tools fail before any shell: Popen raises, bwrap fails its execvp.)"""
    variables = {"PATH": "/nonexistent", "UID": "5"}
    with Pair(name, SPECS[name], workdir_root) as pair:
        assert pair.ours("echo $UID", variables) == pair.raw("echo $UID", variables)


# What kills every process it can reach, or starves the helper: only ever run in a PID namespace.
KILLERS = [
    "kill -9 $$",
    "kill -TERM $$",
    "kill -9 $PPID; kill -TERM $PPID; kill -INT 1; echo $?",
    "kill -9 -1; echo $?",
    "kill -TERM -1; kill -HUP -1; echo $?",
    "kill 0",
    "kill -9 0",
    # pkill -9 -f . where the image has procps; the same by hand where it does not.
    "command -v pkill >/dev/null && pkill -9 -f . || for p in /proc/[0-9]*; do kill -9 ${p#/proc/}; done; echo $?",
    "killall5 -9; echo $?",
    "for fd in /proc/$$/fd/*; do eval \"exec ${fd##*/}>&-\"; done; echo closed >/dev/null",
    "(sleep 30 &) ; kill -9 -1",
    "head -c 2000000 /dev/zero >/tmp/fill; echo $?; rm -f /tmp/fill",
]
SMALL_TMP = {  # a 1 MB /tmp, so that filling it costs nothing
    "docker-bookworm": {"run_options": {"tmpfs": {"/tmp": "size=1m"}}},
    "podman-bookworm": {"run_options": {"tmpfs": {"/tmp": "size=1m"}}},
    "docker-busybox": {"run_options": {"tmpfs": {"/tmp": "size=1m"}}},
    "bubblewrap": {"bwrap_options": ["--size", "1048576", "--tmpfs", "/tmp"]},
    "bubblewrap-rootfs": {"bwrap_options": ["--size", "1048576", "--tmpfs", "/tmp"]},
}


@pytest.fixture(params=params(*NAMESPACED, "docker-busybox"))
def namespaced(request, workdir_root):
    with Pair(request.param, {**SPECS[request.param], **SMALL_TMP[request.param]}, workdir_root) as pair:
        yield pair


def test_no_command_kills_its_instance(namespaced):
    for command in KILLERS:
        try:
            result = namespaced.env.execute(command, TIMEOUT_S)
        except ServiceError as exc:
            # The sh loop's waiter for the command can be among what the command kills.
            assert namespaced.shell == "sh" and "exit status is lost" in exc.message, (command, exc.message)
        else:
            assert not result["timed_out"], command
        after = namespaced.env.execute("echo alive", TIMEOUT_S)
        assert (after["output"], after["returncode"]) == (b"alive\n", 0), command
        assert namespaced.env.helper.alive(), command


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_a_command_that_outlives_its_waiter_is_ended_before_the_answer(name, workdir_root):
    """In the sh loop a command can kill the subshell that waits for it and go on: what it does next
    (here a second `kill -1` a moment later) must not reach the commands after its answer."""
    with Pair(name, SPECS[name], workdir_root) as pair:
        with pytest.raises(ServiceError, match="exit status is lost, and what still ran of it was killed"):
            pair.env.execute("kill -TERM -1; sleep 1; kill -HUP -1; echo killed >/tmp/late", TIMEOUT_S)
        after = pair.env.execute("sleep 2; cat /tmp/late; echo alive", TIMEOUT_S)
        assert (after["output"], after["returncode"]) == (b"cat: can't open '/tmp/late': No such file or directory\n"
                                                         b"alive\n", 0)


@pytest.mark.parametrize("name", params(*NAMESPACED))
def test_a_command_that_kills_every_process_gets_its_true_exit_code(name, workdir_root):
    with Pair(name, SPECS[name], workdir_root) as pair:
        for command in ("kill -9 -1; echo $?", "kill -9 -1; exit 3", "kill -9 -1; kill -9 $$"):
            if pair.env.type == "bubblewrap":
                # The one known difference (README): a raw bwrap sandbox holds nothing but its init
                # and the command, so there `kill -1` finds no process to signal and fails; ours
                # also holds the helper's reader, which it kills (and the helper starts again).
                assert pair.raw(command)[0].startswith(b"bash: line 1: kill: (-1) - No such process\n"), command
                assert pair.ours(command) == {"kill -9 -1; echo $?": (b"0\n", 0), "kill -9 -1; exit 3": (b"", 3),
                                              "kill -9 -1; kill -9 $$": (b"", 137)}[command]
            else:
                assert pair.ours(command) == pair.raw(command), command


@pytest.mark.parametrize("name", params("local", "docker-bookworm", "docker-busybox", "bubblewrap"))
def test_two_hundred_concurrent_timeouts_print_nothing_after_the_deadline(name, workdir_root):
    with Pair(name, SPECS[name], workdir_root) as pair:
        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(lambda _: pair.env.execute("echo start; sleep 2; echo never", 0.5), range(200)))
    run_ons = [r for r in results if b"never" in r["output"]]
    assert not run_ons, f"{len(run_ons)} of 200 printed after their deadline"
    assert all(r["timed_out"] and (r["returncode"], r["signal"]) == (137, "SIGKILL") for r in results)
    assert {r["output"] for r in results} <= {b"", b"start\n"}


@pytest.mark.parametrize("name", params("docker-bookworm", "bubblewrap-rootfs", "docker-busybox"))
def test_a_helper_killed_from_outside_comes_back_within_the_next_request(name, workdir_root):
    # A bubblewrap sandbox comes back only when asked (else it is lost: tests/test_dead_backends.py).
    with Pair(name, {**SPECS[name], **({"revive": True} if SPECS[name]["type"] == "bubblewrap" else {})},
              workdir_root) as pair:
        env = pair.env
        assert env.execute("echo kept >/root/kept 2>/dev/null || echo kept >/work/kept", 10)["returncode"] == 0
        running = env.spawn("sleep 30", 60, None, None, env.config["output_limit"])
        wait_for(lambda: env.execute("cat /proc/[0-9]*/comm | grep -qx sleep", 10)["returncode"] == 0,
                 what="the command to run")
        if env.type == "bubblewrap":
            os.killpg(env.helper_proc.pid, signal.SIGKILL)  # as the OOM killer would
        else:
            env.container.kill()
        if env.helper.pid_one:  # the command died with the instance's PID 1: SIGKILL
            interrupted = running.wait()
            assert (interrupted["returncode"], interrupted["signal"]) == (137, "SIGKILL")
            assert "killed from outside" in interrupted["message"]
        else:
            with pytest.raises(ServiceError, match="the exec helper inside the instance ended while the command ran"):
                running.wait()
        result = env.execute("cat /root/kept 2>/dev/null || cat /work/kept; echo $$", 30)
        assert result["returncode"] == 0 and result["output"].startswith(b"kept\n")
        assert env.helper.alive()


@pytest.mark.parametrize("name", params("docker-busybox", "bubblewrap"))
def test_an_instance_that_is_not_revived_answers_lost_to_every_command(name, workdir_root):
    """A container past its container_timeout, a sandbox killed from outside without `revive`: the
    helper is not started again, and no command after waits for one (the failed revival made new
    FIFOs that nothing holds, which looked like a live helper: the second command ran to its timeout)."""
    with Pair(name, {**SPECS[name], **({"container_timeout": 3} if SPECS[name]["type"] == "docker" else {})},
              workdir_root) as pair:
        env = pair.env
        if env.type == "bubblewrap":
            os.killpg(env.helper_proc.pid, signal.SIGKILL)
        wait_for(lambda: not env.helper.alive(), timeout=30, what="the helper to end")
        for _ in range(2):
            with pytest.raises(ServiceError) as lost:
                env.execute("true", 5)
            assert lost.value.code == "instance_lost"


@pytest.mark.parametrize("name", params("local", "docker-bookworm", "podman-bookworm", "bubblewrap-rootfs"))
def test_a_login_shell_as_the_shell_behaves_as_bash_lc(name, workdir_root):
    """`shell: ["bash", "-lc"]`: the command is the last argument; /etc/profile and BASH_ENV apply."""
    with Pair(name, {**SPECS[name], "shell": ["bash", "-lc"]}, workdir_root) as pair:
        commands = ["shopt -q login_shell && echo login", "echo $0 $-", "echo $LINENO; foo", "env | sort",
                    'echo "${BASH_EXECUTION_STRING}"']
        for command in commands:
            assert pair.ours(command) == pair.raw(command), command
        result = pair.env.execute("shopt -q login_shell && echo login; echo ${FROM_BASH_ENV-}", 10)
        assert result["output"] == b"login\n\n"


def test_bash_env_applies_per_command(workdir_root, tmp_path):
    script = tmp_path / "env.sh"
    script.write_text("FROM_BASH_ENV=yes\n")
    with Pair("local", {"type": "local", "shell": ["bash", "-c"]}, workdir_root) as pair:
        result = pair.env.execute("echo ${FROM_BASH_ENV-no}", 10, env={"BASH_ENV": str(script)})
        assert result["output"] == b"yes\n"
        assert pair.env.execute("echo ${FROM_BASH_ENV-no}", 10)["output"] == b"no\n"


def test_shell_must_be_a_name_or_an_argv_prefix():
    cls = backend("docker")
    for bad in ([], [""], "", ["bash", 3], 7):
        with pytest.raises(ServiceError, match="shell"):
            cls.parse_config({"type": "docker", "image": "x", "shell": bad})
    assert cls.parse_config({"type": "docker", "image": "x", "shell": ["bash", "-lc"]})["shell"] == ["bash", "-lc"]


@pytest.mark.daemon  # bwrap
def test_the_helper_starts_on_an_agent_whose_descriptors_are_past_1023(workdir_root):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"the hard limit on descriptors here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with Pair("bubblewrap", SPECS["bubblewrap"], workdir_root) as pair:
            assert pair.env.helper._life > 1023
            assert pair.env.execute("echo ok", 10)["output"] == b"ok\n"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The differences from `bash -c` the README lists, pinned: each test fails when one goes away
# (then the README is wrong) or changes.

@pytest.mark.parametrize("name", params("docker-bookworm", "podman-bookworm"))
def test_known_difference_the_parent_of_a_command_is_the_helper(name, workdir_root):
    with Pair(name, SPECS[name], workdir_root) as pair:
        assert pair.ours("echo $PPID") == (b"1\n", 0)
        assert pair.raw("echo $PPID") == (b"0\n", 0)


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_known_difference_sh_images_lose_the_status_of_a_command_that_kills_every_process(name, workdir_root):
    with Pair(name, SPECS[name], workdir_root) as pair:
        with pytest.raises(ServiceError, match="exit status is lost"):
            pair.env.execute("kill -9 -1; echo $?", TIMEOUT_S)
        assert pair.ours("echo alive") == (b"alive\n", 0)


@pytest.mark.parametrize("name", params("docker-plain-exec", "docker-bookworm-plain-exec"))
def test_without_the_fast_path_signals_and_the_parent_are_as_bash_c(name, workdir_root):
    """The plain path execs the command in the exec's own process: nothing ignores SIGINT, and
    its parent is outside the container."""
    with Pair(name, SPECS[name], workdir_root) as pair:
        for command in ("trap 'echo int' INT; kill -INT $$; echo after", "echo $PPID"):
            assert pair.ours(command) == pair.raw(command)
        assert pair.ours("echo $PPID") == (b"0\n", 0)


@pytest.mark.parametrize("name", params("docker-bookworm-plain-exec"))
def test_without_the_fast_path_a_timeout_kills_the_command_and_spares_later_ones(name, workdir_root):
    with Pair(name, SPECS[name], workdir_root) as pair:
        result = pair.env.execute("echo start; sleep 30 & sleep 30; echo late", 1.0)
        assert (result["output"], result["returncode"], result["timed_out"]) == (b"start\n", 137, True)
        assert result["duration_s"] < 5
        quick = pair.env.execute("echo quick", 1.0)  # its watchdog, still polling, must spare the next command
        assert (quick["output"], quick["timed_out"]) == (b"quick\n", False)
        survivor = pair.env.execute("sleep 1.5; echo survived", 5.0)
        assert (survivor["output"], survivor["returncode"]) == (b"survived\n", 0)
