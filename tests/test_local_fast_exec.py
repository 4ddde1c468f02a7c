"""`local` with fast_exec (issue 16 part 3): a command's process is a spare shell started ahead.

The fidelity corpus and the variables test run through it (tests/test_fidelity.py, `local-fast`,
which checks each command ran in a spare), and so do the backend tests of tests/test_environments.py.
Here: that commands really run in the spare, that every case a spare cannot serve as the direct
spawn would (a long command, PATH or a shell's variable set, a cwd through a link or relative, a
cwd that is gone) answers as fast_exec off does, that a spare killed, stopped or its pipe filled
by a process of the instance is passed over, and that nothing of a spare outlives its instance
or its agent.
"""

import os
import signal
import subprocess
import sys
import tempfile
import uuid

import pytest

from arservice.environments import backend, spare
from arservice.environments.local import TAG
from arservice.environments.process import marked_processes

from helpers import alive, proc_stat, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="arservice-fast-exec-") as path:
        yield path


def started(root, fast_exec=True, **spec):
    cls = backend("local")
    env = cls(f"i-{uuid.uuid4().hex[:12]}", cls.parse_config({"type": "local", "fast_exec": fast_exec, **spec}),
              "test", root)
    env.start()
    return env


def spare_pid(env):
    """The instance's spare, once the thread that starts spares has run."""
    spare.STARTER.submit(lambda: None).result(timeout=10)  # its queue is in order: what came before is done
    assert env.spares.spare is not None, "no spare was started"
    return env.spares.spare.proc.pid


def test_commands_run_in_the_spare_and_the_next_is_started_after_the_answer(root):
    env = started(root)
    try:
        for _ in range(3):
            pid = spare_pid(env)
            result = env.execute("echo $$; echo $PPID", 10)
            assert result["output"].decode().split() == [str(pid), str(os.getpid())]
            assert spare_pid(env) != pid
    finally:
        env.close()


@pytest.mark.parametrize("command, variables, cwd", [
    ("echo " + "x" * 5000 + " | wc -c", None, None),  # a script longer than one atomic pipe write
    ("echo $PATH; command -v ls", {"PATH": "/usr/bin:/bin"}, None),  # Popen looks the shell up in it
    ("echo $SHLVL $OPTIND $IFS", {"SHLVL": "7", "OPTIND": "x", "IFS": ","}, None),  # dash would not pass them
    ("pwd; echo $PWD $OLDPWD", {"PWD": "/nowhere", "OLDPWD": "/else"}, None),
    ("pwd; echo $PWD; cd -; env | grep -c PWD=", None, "sub"),
    ("pwd; pwd -P", None, "link/.."),  # chdir follows the link before the `..`: a logical cd would not
    ("echo to stdin >&0; echo $?; read -r x; echo $?", None, None),  # /dev/null, opened for both
    ("pwd; pwd -P", None, "/proc/self/cwd"),  # the agent's, as in Popen's child, not the spare's
    ("tr '\\0' '\\n' </proc/$$/environ | sort", {"X": "1"}, None),  # the same variables (in dash's order)
], ids=["long", "path", "shell-variables", "cd-variables", "cwd", "cwd-through-a-link", "stdin", "cwd-in-proc-self",
        "environment-block"])
@pytest.mark.parametrize("agent_has_them", [True, False], ids=["agent-pwd", "agent-no-pwd"])
def test_what_a_spare_runs_answers_as_the_direct_spawn(root, monkeypatch, command, variables, cwd, agent_has_them):
    """Through the cases, and with an agent whose own environment has PWD and OLDPWD or not (the
    spare's `cd` sets them: the command sees what the direct spawn gives)."""
    for name in ("PWD", "OLDPWD"):
        if agent_has_them:
            monkeypatch.setenv(name, "/")
        else:
            monkeypatch.delenv(name, raising=False)
    envs = [started(root, fast_exec) for fast_exec in (False, True)]
    try:
        results = []
        for env in envs:
            os.makedirs(os.path.join(env.cwd, "sub", "inner"))
            os.symlink(os.path.join(env.cwd, "sub", "inner"), os.path.join(env.cwd, "link"))
            results.append(env.execute(command, 10, cwd=cwd, env=variables))
        direct, fast = [(r["output"].replace(env.cwd.encode(), b"CWD").replace(env.instance_id.encode(), b"ID"),
                         r["returncode"]) for r, env in zip(results, envs, strict=True)]
        assert fast == direct and direct[1] in (0, 1)
    finally:
        for env in envs:
            env.close()


def test_a_relative_cwd_is_the_agents_and_a_gone_one_fails_as_it_does_directly(root):
    answers, errors = [], []
    for fast_exec in (False, True):
        env = started(root, fast_exec, cwd=os.path.relpath(root))
        try:
            answers.append(env.execute("pwd", 10)["output"])
            with pytest.raises(OSError) as error:
                env.execute("true", 10, cwd="gone")
            errors.append((type(error.value), error.value.errno))
        finally:
            env.close()
    assert answers[0] == answers[1] == f"{os.path.realpath(root)}\n".encode()
    assert errors[0] == errors[1] == (FileNotFoundError, 2)


@pytest.mark.parametrize("name", ["IFS", "a-b"])
def test_an_environment_dash_would_not_pass_on_as_given_gets_no_spares(root, name):
    """dash resets IFS, OPTIND and PPID, and drops names that are no shell variable's."""
    env = started(root, env={name: ","})
    try:
        assert env.spares is None
        assert env.execute(f"tr '\\0' '\\n' </proc/$$/environ | grep ^{name}=", 10)["output"] == f"{name}=,\n".encode()
    finally:
        env.close()


@pytest.mark.parametrize("hostile", ["kill", "stop", "fill"])
def test_a_spare_the_instance_broke_is_passed_over(root, hostile):
    env = started(root)
    try:
        pid = spare_pid(env)
        if hostile == "kill":
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: proc_stat(pid)[1] == b"Z", timeout=10, what="the spare to die")
        elif hostile == "stop":
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: proc_stat(pid)[1] == b"T", timeout=10, what="the spare to stop")
        else:  # its stdin is a pipe: anyone of its uid may fill it through /proc
            fd = os.open(f"/proc/{pid}/fd/0", os.O_WRONLY | os.O_NONBLOCK)
            try:
                while True:
                    os.write(fd, b"#" * 4096)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        broken = env.spares.spare
        result = env.execute("echo $(( 6 * 7 ))", 10)
        assert (result["output"], result["returncode"], result["timed_out"]) == (b"42\n", 0, False)
        assert spare_pid(env) != pid  # a new one is there for the next command
        assert proc_stat(pid) is None and broken.proc.stdout.closed  # the broken one killed, reaped, its pipe closed
    finally:
        env.close()


def test_spares_come_back_after_a_command_whose_answer_is_never_sent(root):
    """A session's bash is spawned as any command, but no answer is ever sent for it."""
    env = started(root)
    try:
        session_shell = env.spawn("sleep 30", 60, None, None, 1000)
        assert isinstance(session_shell, spare.SpareCommand)
        env.execute("true", 10)  # no spare: spawned directly, and one is asked for
        pid = spare_pid(env)
        assert env.execute("echo $$", 10)["output"] == f"{pid}\n".encode()
    finally:
        env.close()


def test_nothing_of_the_spares_outlives_the_instance(root):
    env = started(root)
    spares = [spare_pid(env)]
    env.execute("sleep 30 &", 10)
    spares.append(spare_pid(env))
    env.execute("true", 10)  # and close at once, while the next spare may still be starting
    env.close()
    spare.STARTER.submit(lambda: None).result(timeout=10)
    assert [pid for pid, _ in marked_processes(f"{TAG}={env.instance_id}".encode())] == []
    assert all(proc_stat(pid) is None for pid in spares)  # killed and reaped, not left as zombies
    assert env.spares.spare is None


def test_a_spare_whose_agent_was_killed_exits_by_itself(root):
    """No reap needed: the dead agent's end of its pipe is closed, and the spare reads end of file."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from arservice.environments import backend
cls = backend("local")
env = cls("i-killedagent1", cls.parse_config({{"type": "local", "fast_exec": True}}), "test", {root!r})
env.start()
print(env.spares.spare.proc.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        assert alive(pid)
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: not alive(pid), timeout=10, what="the spare to exit")
