"""What every backend promises, run against each real backend this machine has."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.client import ServiceError

from backends import SPECS, params
from helpers import Service, live_processes, run_in_threads, wait_for

# Podman is here with busybox, the plain exec path with docker-plain-exec (the bookworm variants are
# for the fidelity corpus, tests/test_fidelity.py).
ALL = params(*(name for name in SPECS if name not in ("podman-bookworm", "docker-bookworm-plain-exec")))
# Specs whose commands run in sh: a busybox image has no bash, and one asks for sh.
SH_ONLY = {"docker-busybox", "docker-plain-exec", "podman", "bubblewrap-rootfs-sh"}


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", '{"instances": 16}').wait_ready()
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module", params=ALL)
def env(request, service):
    """(client, instance id, spec name): one instance per backend, shared by this module's tests."""
    client = service.client
    instance_id = client.start_instance(SPECS[request.param])["instance_id"]
    yield client, instance_id, request.param
    client.close_instance(instance_id)


def test_exit_codes_and_merged_output(env):
    client, instance_id, _ = env
    result = client.execute(instance_id, "echo out; echo err >&2; exit 7")
    assert (result["returncode"], result["output"], result["timed_out"]) == (7, "out\nerr\n", False)


def test_commands_are_stateless_and_take_cwd_and_env(env):
    client, instance_id, _ = env
    home = client.execute(instance_id, "pwd")["output"]
    assert client.execute(instance_id, "cd /tmp && export X=1 && pwd")["output"] == "/tmp\n"
    assert client.execute(instance_id, 'pwd; echo "x=$X"')["output"] == home + "x=\n"
    result = client.execute(instance_id, 'pwd; echo "$GREETING"', cwd="/tmp", env={"GREETING": "hi there"})
    assert result["output"] == "/tmp\nhi there\n"
    client.execute(instance_id, "mkdir -p sub")
    assert client.execute(instance_id, "basename $PWD", cwd="sub")["output"] == "sub\n"  # relative to its cwd


def test_commands_get_a_fresh_shell_of_the_right_kind(env):
    client, instance_id, name = env
    # bash where the image has it; and nothing of the exec helper's own shell shows through
    result = client.execute(instance_id, 'echo "bash=${BASH_VERSION:+yes} args=$# [$d$me$jc$ss$op$id$sh$p]"')
    assert result["output"] == f"bash={'' if name in SH_ONLY else 'yes'} args=0 []\n"


def test_exact_bytes(env):
    client, instance_id, _ = env
    result = client.execute(instance_id, r"printf 'a\000b\377c\n\200'", raw=True)
    assert result["output"] == b"a\x00b\xffc\n\x80"


def test_a_large_output_comes_back_byte_for_byte_over_zmq_and_http(env, service):
    """Output past the broker's PASS_ON_BYTES passes through it undecoded, with the client's id put in."""
    client, instance_id, _ = env
    expected = "".join(f"{i}\n" for i in range(1, 120_001)).encode()  # 0.7 MB
    for via in (client, service.http):
        result = via.execute(instance_id, "seq 1 120000; exit 3", raw=True)
        assert (result["output"] == expected, result["returncode"], result["truncated"]) == (True, 3, False)


def test_ten_megabytes_are_truncated_to_head_and_tail(env):
    client, instance_id, _ = env
    result = client.execute(instance_id, "echo START; head -c 10000000 /dev/zero | tr '\\000' x; echo; echo END",
                            output_limit=100_000)
    output = result["output"]
    assert result["truncated"] and result["returncode"] == 0
    assert output.startswith("START\nxxx") and output.endswith("xxx\nEND\n")
    assert len(output.encode()) <= 100_000 + 200  # the limit plus the marker between head and tail


def test_timeout_kills_every_process_of_the_command(env):
    client, instance_id, _ = env
    marker = f"{900 + uuid.uuid4().int % 99}.{uuid.uuid4().int % 1000}"  # a sleep argument nothing else uses
    result = client.execute(instance_id, f"sleep {marker} & sleep {marker}; echo never", timeout=1)
    assert result["timed_out"] and "never" not in result["output"]
    # Container processes are host processes too, so one look at the host covers every backend.
    wait_for(lambda: not live_processes(f"sleep {marker}"), timeout=10, what="the command's processes to go")


def test_file_round_trip_and_mode(env):
    client, instance_id, _ = env
    data = bytes(range(256)) * 40
    client.write_file(instance_id, "sub/blob.bin", data)
    assert client.read_file(instance_id, "sub/blob.bin") == data
    client.write_file(instance_id, "run.sh", "#!/bin/sh\necho ran \"$@\"\n", mode=0o755)
    assert client.execute(instance_id, "./run.sh a b")["output"] == "ran a b\n"
    with pytest.raises(ServiceError) as err:
        client.read_file(instance_id, "no-such-file")
    assert err.value.code == "not_found"
    with pytest.raises(ServiceError) as err:
        client.read_file(instance_id, "sub/blob.bin", limit=100)
    assert err.value.code == "payload_too_large"


def test_commands_of_one_instance_run_concurrently(env):
    """Each command waits until all have started, so they only finish if they run at once."""
    client, instance_id, _ = env
    count, tag = 6, uuid.uuid4().hex[:8]
    command = (f"touch started.{tag}.$N; i=0; while [ $(ls started.{tag}.* | wc -l) -lt {count} ]; do "
               f"sleep 0.05; i=$((i+1)); [ $i -gt 400 ] && exit 9; done; echo ok $N")
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda n: client.execute(instance_id, command, env={"N": str(n)}, timeout=60), range(count)))
    assert [(r["returncode"], r["output"]) for r in results] == [(0, f"ok {n}\n") for n in range(count)]


def test_many_short_commands_from_many_threads(env):
    client, instance_id, _ = env
    errors = []

    def worker(n):
        for i in range(20):
            result = client.execute(instance_id, f"echo {n}-{i}")
            if result["output"] != f"{n}-{i}\n":
                errors.append(result)

    run_in_threads(worker, 8)
    assert errors == []


# More than the agent's worker threads (256): a command must not hold one while it runs.
MANY = 300


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", params("local", "docker-busybox", "bubblewrap"))
def test_long_commands_hold_no_worker_thread(service, name):
    """Hundreds of running commands in one instance neither wait for each other nor hold up
    starting and closing instances; closing their instance answers each of them."""
    client = service.client
    instance_id = client.start_instance(SPECS[name])["instance_id"]
    marker = f"{800 + uuid.uuid4().int % 99}.{uuid.uuid4().int % 1000}"  # a sleep argument nothing else uses
    answers = []
    try:
        def run(_):
            try:
                answers.append(client.execute(instance_id, f"sleep {marker}", timeout=200))
            except ServiceError as exc:
                answers.append(exc.code)
            except Exception as exc:  # kept, so that a failure in a thread shows
                answers.append(repr(exc))

        threads = ThreadPoolExecutor(MANY)
        threads.map(run, range(MANY))

        def all_running():
            assert not answers, f"a command was answered before all {MANY} ran: {answers[:3]}"
            return len(live_processes(f"sleep {marker}")) == MANY
        wait_for(all_running, timeout=60, what=f"{MANY} commands to run at once")
        other = client.start_instance({"type": "local"})["instance_id"]
        assert client.execute(other, "echo ok")["output"] == "ok\n"
        client.close_instance(other)
        assert answers == []  # nothing ended on the way
    finally:
        client.close_instance(instance_id)
        threads.shutdown(wait=True)
    # Each command ends with its instance: killed (local) or cut off with the instance (containers).
    assert len(answers) == MANY
    assert all(a == "environment_error" or (isinstance(a, dict) and a["signal"] == "SIGKILL") for a in answers), answers[:3]
