"""`arservice status | start | exec | close` as a person or a script runs them, against a real service."""

import json
import os
import subprocess
import sys

import pytest

from arservice.console import EXIT_CODES, UNREACHABLE

from helpers import Service, free_port

pytestmark = pytest.mark.timeout(90)

TOKEN = "cli-test-token"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    presets = tmp_path_factory.mktemp("presets") / "presets.json"
    presets.write_text(json.dumps({"tmp": {"type": "local", "cwd": "/tmp"}}))
    svc = Service("--runner", "local", "--environments", str(presets), token=TOKEN).wait_ready()
    yield svc
    assert svc.stop() == 0


def arservice(service, *args, token=TOKEN, url=None):
    env = dict(os.environ, ARSERVICE_URL=url or service.url)
    env.pop("ARSERVICE_TOKEN", None)
    if token:
        env["ARSERVICE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "arservice", *args], check=False, capture_output=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def instance(service):
    result = arservice(service, "start", '{"type": "local"}')
    assert result.returncode == 0, result.stderr
    instance_id = result.stdout.decode().strip()
    yield instance_id
    arservice(service, "close", instance_id)


def test_start_exec_close(service):
    started = arservice(service, "start", "tmp", "--json")
    assert started.returncode == 0, started.stderr
    instance_id = json.loads(started.stdout)["instance_id"]
    assert instance_id in {i["instance_id"] for i in service.client.instances()}
    # The command's words after INSTANCE are its own, dashes included; its output is the bytes it printed.
    result = arservice(service, "exec", instance_id, "pwd;", "echo", "-n", "--url", "x")
    assert result.returncode == 0 and result.stdout == b"/tmp\n--url x", result
    closed = arservice(service, "close", instance_id)
    assert closed.returncode == 0 and closed.stdout.decode().strip() == f"closed {instance_id}"
    assert instance_id not in {i["instance_id"] for i in service.client.instances()}
    again = arservice(service, "close", instance_id)
    assert again.returncode == EXIT_CODES["not_found"] == 66
    assert again.stderr.decode().strip() == f"arservice: error: not_found: no instance '{instance_id}'"


def test_exec_exits_with_the_command_exit_code(service, instance):
    result = arservice(service, "exec", instance, "printf 'out\\0put'; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == b"out\0puterr\n"  # stdout and stderr merged, exact bytes
    assert arservice(service, "exec", instance, "kill -TERM $$").returncode == 128 + 15
    options = arservice(service, "exec", "--env", "A=1=2", "--cwd", "/", instance, 'echo "$A $PWD"')
    assert options.returncode == 0 and options.stdout == b"1=2 /\n"


def test_exec_that_hits_its_time_limit_exits_124(service, instance):
    result = arservice(service, "exec", "--timeout", "0.3", instance, "echo begun; sleep 30")
    assert result.returncode == 124
    assert result.stdout == b"begun\n"
    assert "time limit" in result.stderr.decode()


def test_status_shows_agents_and_instances(service, instance):
    result = arservice(service, "status")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    agent = service.client.available_resources()["agents"][0]["agent_id"]
    assert "AGENT" in text and "INSTANCE" in text
    assert any(line.startswith(agent) for line in text.splitlines())
    row = next(line for line in text.splitlines() if line.startswith(instance))
    assert row.split()[1:3] == ["local", "running"]
    as_json = json.loads(arservice(service, "status", "--json").stdout)
    assert instance in {i["instance_id"] for i in as_json["instances"]}


def test_status_shows_slurm_jobs(service):
    report = {"runner": "slurm", "jobs": {"running": 1}, "job_list": [
        {"job_id": "777", "state": "running", "cancelled": True, "agent_ids": ["a-1"], "instances": 2}]}
    service.client.request("runner_status", status=report)
    try:
        text = arservice(service, "status").stdout.decode()
    finally:
        service.client.request("runner_status", status={"runner": "local"})
    assert "SLURM JOB" in text
    assert next(line for line in text.splitlines() if line.startswith("777")).split() == \
        ["777", "running", "(cancelling)", "a-1", "2"]


@pytest.mark.parametrize("args,token,exit_code,words", [
    (["exec", "i-000000000000", "true"], TOKEN, EXIT_CODES["not_found"], "not_found"),
    (["status"], "wrong", EXIT_CODES["unauthorized"], "unauthorized"),
    (["status"], None, EXIT_CODES["unauthorized"], "unauthorized"),
    (["start", '{"type": "local", "timeout": "soon"}'], TOKEN, EXIT_CODES["invalid_request"], "invalid_request"),
    (["start", "no-such-preset"], TOKEN, EXIT_CODES["not_found"], "no-such-preset"),
    (["start", '{"type": '], TOKEN, 2, "SPEC is not valid JSON"),
    (["exec", "--env", "NOEQUALS", "i-000000000000", "true"], TOKEN, 2, "NAME=VALUE"),
])
def test_service_errors_map_to_documented_exit_codes(service, args, token, exit_code, words):
    result = arservice(service, *args, token=token)
    assert result.returncode == exit_code, result
    stderr = result.stderr.decode()
    assert words in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert result.stdout == b""


def test_no_service_at_the_url(service):
    result = arservice(service, "status", url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == UNREACHABLE
    assert "cannot reach the service" in result.stderr.decode()
