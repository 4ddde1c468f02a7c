"""Persistent shell sessions against the real service and real backends: state, exact output,
timeouts that leave the session usable, parallel sessions, their ends, and bad input."""

import asyncio
import os
import threading
import uuid

import pytest

from arservice.aio import AsyncHTTPClient, AsyncZMQClient
from arservice.client import ServiceError

from backends import SPECS, params
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)

BACKENDS = params("local", "local-fast", "docker-bookworm", "podman-bookworm", "bubblewrap")


@pytest.fixture(params=["zmq", "http"])
def client(request, one_agent_service):
    return one_agent_service.client if request.param == "zmq" else one_agent_service.http


@pytest.fixture
def open_instance(one_agent_service):
    started = []

    def start(name="local"):
        started.append(one_agent_service.client.start_instance(SPECS[name])["instance_id"])
        return started[-1]
    yield start
    for instance_id in started:
        try:
            one_agent_service.client.close_instance(instance_id)
        except ServiceError as exc:
            assert exc.code == "not_found"


def marked_pids(mark: str) -> list[int]:
    """Host processes whose command line holds `mark` (a container's are host processes too)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_persists_and_output_is_what_bash_gives(one_agent_service, open_instance, backend):
    c = one_agent_service.client
    inst = open_instance(backend)
    assert c.create_session(inst) == {"session": "default"}
    # The session's bash starts where a command would: the same environment (SHLVL too) and cwd.
    start = "env | sort; pwd; umask"
    assert c.run_in_session(inst, "default", start, raw=True)["output"] == c.execute(inst, start, raw=True)["output"]
    assert c.run_in_session(inst, "default", "cd /tmp && export X=5; Y=6; f() { echo \"fn $1\"; }; set -o pipefail",
                            raw=True)["output"] == b""
    r = c.run_in_session(inst, "default", "pwd; echo $X $Y; f a; echo $-; false | true", raw=True)
    assert (r["output"], r["returncode"], r["timed_out"], r["session_ended"]) == (b"/tmp\n5 6\nfn a\nhBc\n", 1, False, False)
    # Exact bytes, stdout and stderr merged in order, error text and $LINENO as a fresh `bash -c` has them.
    for command in ("printf 'a\\0b\\xff'; echo err >&2; echo out", "nosuchcommand", "echo $LINENO\necho $LINENO",
                    "echo $((1/0))", "exit_status_is() { return 3; }; exit_status_is"):
        got = c.run_in_session(inst, "default", command, raw=True)
        want = c.execute(inst, command, cwd="/tmp", raw=True)
        assert (got["output"], got["returncode"]) == (want["output"], want["returncode"]), command
    # Streamed, the same answer, its output in chunks.
    *chunks, answer = c.run_in_session_stream(inst, "default", "echo a; sleep 0.1; echo b >&2", raw=True)
    assert (b"".join(chunks), answer["output"], answer["returncode"]) == (b"a\nb\n", b"a\nb\n", 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timeout_kills_what_the_command_started_and_the_session_goes_on(one_agent_service, open_instance, backend):
    c = one_agent_service.client
    inst = open_instance(backend)
    mark = f"mark{uuid.uuid4().hex[:12]}"
    c.create_session(inst, "s")
    c.run_in_session(inst, "s", f"cd /tmp; V=kept; sh -c 'sleep 300; :' bg{mark} &")  # a background job: it lives on
    r = c.run_in_session(inst, "s", f"echo partial; for i in 1 2; do sh -c 'sleep 300; :' fg{mark}; done; echo after",
                         timeout=1, raw=True)
    assert (r["output"], r["returncode"], r["timed_out"], r["session_ended"]) == (b"partial\n", 137, True, False)
    wait_for(lambda: not marked_pids(f"fg{mark}"), 5, what="the timed-out command's processes gone")
    assert marked_pids(f"bg{mark}"), "an earlier command's background job was killed too"
    r = c.run_in_session(inst, "s", "echo $V; pwd", raw=True)
    assert (r["output"], r["returncode"]) == (b"kept\n/tmp\n", 0)
    c.close_instance(inst)
    wait_for(lambda: not marked_pids(mark), 10, what="every process of the instance gone with it")


def test_a_timeout_inside_a_shell_function_ends_the_session_and_says_so(one_agent_service, open_instance):
    c = one_agent_service.client
    inst = open_instance()
    c.create_session(inst)
    r = c.run_in_session(inst, "default", "f() { sleep 300; echo after; }; f", timeout=0.5)
    assert (r["timed_out"], r["session_ended"]) == (True, True)
    assert "shell function" in r["message"]
    with pytest.raises(ServiceError) as err:
        c.run_in_session(inst, "default", "true")
    assert err.value.code == "conflict" and "ended" in err.value.message


def test_exit_ends_the_session_with_its_status_and_the_name_can_be_used_again(one_agent_service, open_instance):
    c = one_agent_service.client
    inst = open_instance()
    c.create_session(inst, "e")
    r = c.run_in_session(inst, "e", "echo bye; exit 3", raw=True)
    assert (r["output"], r["returncode"], r["session_ended"]) == (b"bye\n", 3, True)
    assert "exited with status 3" in r["message"]
    c.create_session(inst, "e")
    assert c.run_in_session(inst, "e", "echo again")["output"] == "again\n"


def test_sessions_of_an_instance_run_in_parallel(one_agent_service, open_instance):
    c = one_agent_service.client
    inst = open_instance()
    c.create_session(inst, "a")
    c.create_session(inst, "b")
    answers = {}
    # a waits for what b does: it can only end if b runs while a does.
    waiter = threading.Thread(target=lambda: answers.update(a=c.run_in_session(
        inst, "a", "while [ ! -e flag ]; do sleep 0.01; done; echo seen", timeout=20)))
    waiter.start()
    assert c.run_in_session(inst, "b", "touch flag")["returncode"] == 0
    waiter.join(30)
    assert answers["a"]["output"] == "seen\n"
    assert c.close_session(inst, "a") == {"session": "a", "closed": True}


def test_closing_an_instance_ends_its_sessions_and_all_they_run(one_agent_service, open_instance):
    c = one_agent_service.client
    inst = open_instance()
    mark = f"mark{uuid.uuid4().hex[:12]}"
    c.create_session(inst)
    c.run_in_session(inst, "default", f"setsid sh -c 'sleep 300; :' {mark} & sh -c 'sleep 300; :' {mark} &")
    busy = threading.Thread(target=lambda: pytest.raises(ServiceError, c.run_in_session, inst, "default",
                                                         f"sh -c 'sleep 300; :' {mark}", timeout=60))
    busy.start()
    wait_for(lambda: len(marked_pids(mark)) >= 3, 10, what="the session's processes running")
    c.close_instance(inst)
    busy.join(30)
    assert not busy.is_alive(), "the command in flight was not answered when its instance closed"
    wait_for(lambda: not marked_pids(mark), 10, what="the session's processes gone")


def test_bad_input_gets_a_clear_error_and_changes_nothing(one_agent_service, client, open_instance):
    inst = open_instance()
    client.create_session(inst, "one")
    cases = [
        (lambda: client.create_session(inst, "one"), "conflict", "exists already"),
        (lambda: client.create_session(inst, "bad name!"), "invalid_request", "session name"),
        (lambda: client.create_session(inst, "z", shell="sh"), "invalid_request", "must be bash"),
        (lambda: client.run_in_session(inst, "nope", "true"), "not_found", "no session 'nope'"),
        (lambda: client.run_in_session(inst, "one", "true", timeout=-1), "invalid_request", "timeout"),
        (lambda: client.run_in_session("i-000000000000", "one", "true"), "not_found", "no instance"),
        (lambda: client.close_session(inst, "nope"), "not_found", "no session 'nope'"),
    ]
    for call, code, text in cases:
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.code == code and text in err.value.message, (code, err.value)
    assert client.run_in_session(inst, "one", "echo still")["output"] == "still\n"
    client.close_instance(inst)
    with pytest.raises(ServiceError) as err:
        client.run_in_session(inst, "one", "true")
    assert err.value.code == "not_found"


def test_a_second_command_while_one_runs_is_refused(one_agent_service, open_instance):
    c = one_agent_service.client
    inst = open_instance()
    c.create_session(inst)
    slow = threading.Thread(target=lambda: c.run_in_session(inst, "default", "touch started; sleep 1"))
    slow.start()
    wait_for(lambda: c.execute(inst, "test -e started")["returncode"] == 0, 10, what="the first command running")
    with pytest.raises(ServiceError) as err:
        c.run_in_session(inst, "default", "true")
    assert err.value.code == "conflict" and "one at a time" in err.value.message
    slow.join(10)


@pytest.mark.parametrize("kind", ["zmq", "http"])
def test_async_clients_run_sessions(one_agent_service, open_instance, kind):
    inst = open_instance()

    async def scenario():
        svc = one_agent_service
        async with (AsyncZMQClient(svc.zmq, token="") if kind == "zmq" else AsyncHTTPClient(svc.url, token="")) as c:
            await c.create_session(inst, "x")
            await c.run_in_session(inst, "x", "Z=async")
            r = await c.run_in_session(inst, "x", "echo $Z", raw=True)
            assert r["output"] == b"async\n"
            assert await c.close_session(inst, "x") == {"session": "x", "closed": True}
    asyncio.run(scenario())


def test_what_differs_from_a_terminal(one_agent_service, open_instance):
    """The differences docs/design.md lists, pinned."""
    c = one_agent_service.client
    inst = open_instance()
    c.create_session(inst)

    def run(command):
        answer = c.run_in_session(inst, "default", command, raw=True)
        return answer["output"], answer["returncode"]
    assert run("cat") == (b"", 0)  # stdin is /dev/null
    assert run("false") == (b"", 1)
    assert run("echo $?") == (b"0\n", 0)  # $? starts at 0
    assert run("break; echo after") == (b"", 0)  # leaves the command, silently
    assert run("echo $-; shopt -q login_shell || echo not-login") == (b"hBc\nnot-login\n", 0)


@pytest.mark.parametrize("backend", params("docker-busybox"))
def test_an_image_without_bash_says_so(one_agent_service, open_instance, backend):
    inst = open_instance(backend)
    with pytest.raises(ServiceError) as err:
        one_agent_service.client.create_session(inst)
    assert err.value.code == "environment_error" and "is bash installed" in err.value.message
    assert one_agent_service.client.execute(inst, "echo fine")["output"] == "fine\n"  # the instance is untouched
