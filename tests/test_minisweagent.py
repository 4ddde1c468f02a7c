"""mini-swe-agent (the real package) on arservice through the shipped environment class.

Trajectories of mini-swe-agent's DefaultAgent with its DeterministicModel are compared with the
ones mini-swe-agent's own environments produce on the same image or host; the environment
behaviours mini-swe-agent tests for its DockerEnvironment are run against ArserviceEnvironment.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest.mock import patch

import pytest

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.agents.default import DefaultAgent
from minisweagent.environments import get_environment
from minisweagent.environments.docker import DockerEnvironment
from minisweagent.environments.extra.bubblewrap import BubblewrapEnvironment
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models.test_models import DeterministicModel, make_output

from arservice.client import ServiceError
from arservice.environments import backend
from arservice.integrations.minisweagent import (
    CLASS_PATH,
    ArserviceEnvironment,
    sleep_seconds,
)

from backends import BOOKWORM, BUSYBOX, missing
from helpers import Service, wait_for

pytestmark = pytest.mark.timeout(120)

SYSTEM = "You are on {{system}}; commands time out after {{timeout}} s."
INSTANCE = "Task: {{task}}"
# A multi-step task: output on both streams, files, exit codes, bytes that are not UTF-8,
# a command past its time limit, and the submission. No command writes to both streams:
# `docker exec` carries them apart and its client may print them in either order.
STEPS = [
    "echo hello; basename \"$PWD\"",
    "echo to-stderr >&2; exit 4",
    "mkdir -p sub && printf 'line1\\nline2\\n' > sub/notes.txt && wc -l < sub/notes.txt",
    "tr a-z A-Z < sub/notes.txt; exit 3",
    "cd sub && ls; false",
    "ls sub/missing-file",
    "printf 'caf\\303\\251 \\377\\n'",
    "echo started; sleep 5",
    "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; cat sub/notes.txt",
]
TIMEOUT_S = 2


def run_agent(env, steps=STEPS):
    outputs = [make_output(f"step {i}", [{"command": command}]) for i, command in enumerate(steps)]
    agent = DefaultAgent(DeterministicModel(outputs=outputs), env, system_template=SYSTEM,
                         instance_template=INSTANCE, step_limit=len(steps) + 1, cost_limit=0)
    try:
        info = agent.run("exercise the environment")
    finally:
        if hasattr(env, "cleanup"):  # mini's LocalEnvironment has nothing to clean up
            env.cleanup()
    return info, agent.messages


def comparable(messages):
    """What a trajectory says: who said what, each observation's output, return code and exception
    type. A timeout's message names the command run, which for DockerEnvironment is its whole
    `docker exec ...` line: compare what it says after that."""
    seen = []
    for message in messages:
        extra = message.get("extra", {})
        content = re.sub(r"Command (.*) timed out after", "Command ... timed out after", message["content"], flags=re.DOTALL)
        seen.append((message["role"], content, extra.get("raw_output"), extra.get("returncode"),
                     extra.get("exception_type"), extra.get("submission")))
    return seen


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--max-resources", '{"instances": 40}').wait_ready()
    yield svc
    assert svc.stop() == 0


def arservice_env(service, **config):
    return ArserviceEnvironment(address=service.zmq, token="", timeout=TIMEOUT_S, **config)


def assert_same_trajectory(ours, theirs):
    (our_info, our_messages), (their_info, their_messages) = ours, theirs
    assert our_info == their_info == {"exit_status": "Submitted", "submission": "line1\nline2\n"}
    assert comparable(our_messages) == comparable(their_messages)
    timed_out = [m for m in our_messages if m.get("extra", {}).get("exception_type") == "TimeoutExpired"]
    assert len(timed_out) == 1 and timed_out[0]["extra"]["raw_output"] == "started\n"
    assert timed_out[0]["extra"]["returncode"] == -1


def skip_unless(*names):
    reasons = [why for name in names if (why := missing(name))]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


@skip_unless("docker-bookworm")
def test_trajectory_on_docker_equals_mini_swe_agents_docker_environment(service):
    theirs = run_agent(DockerEnvironment(image=BOOKWORM, timeout=TIMEOUT_S))
    ours = run_agent(arservice_env(service, image=BOOKWORM, spec={"pull": "never"}))
    assert_same_trajectory(ours, theirs)


def test_trajectory_on_local_equals_mini_swe_agents_local_environment(service, tmp_path):
    # LocalEnvironment runs `sh -c COMMAND` (subprocess's shell=True) in cwd, with this process's environment.
    (tmp_path / "mini" / "work").mkdir(parents=True)
    (tmp_path / "ours" / "work").mkdir(parents=True)
    theirs = run_agent(LocalEnvironment(cwd=str(tmp_path / "mini" / "work"), timeout=TIMEOUT_S))
    ours = run_agent(arservice_env(service, spec={"type": "local"}, interpreter=["sh", "-c"],
                                   cwd=str(tmp_path / "ours" / "work")))
    assert_same_trajectory(ours, theirs)
    # Here even the timeout's message is the same: both name the command alone.
    assert [m["content"] for m in ours[1]] == [m["content"] for m in theirs[1]]


@skip_unless("bubblewrap")
def test_trajectory_on_bubblewrap_equals_mini_swe_agents_bubblewrap_environment(service, tmp_path):
    # mini's BubblewrapEnvironment runs `bash -c COMMAND` in a sandbox with cwd bound writable.
    (tmp_path / "work").mkdir()
    theirs = run_agent(BubblewrapEnvironment(cwd=str(tmp_path / "work"), timeout=TIMEOUT_S))
    ours = run_agent(arservice_env(service, spec={"type": "bubblewrap"}, interpreter=["bash", "-c"], cwd="/work"))
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("transport", ["zmq", "http"])
def test_selected_by_environment_class_from_a_config(service, transport):
    address = service.zmq if transport == "zmq" else service.url
    env = get_environment({"environment_class": CLASS_PATH, "address": address, "token": "",
                           "spec": {"type": "local"}, "cwd": "/tmp"})
    try:
        assert isinstance(env, ArserviceEnvironment)
        assert env.execute({"command": "pwd"}) == {"output": "/tmp\n", "returncode": 0, "exception_info": ""}
    finally:
        env.cleanup()


@pytest.mark.parametrize("kind", ["local", "bubblewrap"])
def test_without_an_image_the_default_cwd_is_the_instances_own(service, kind):
    if why := missing(kind):
        pytest.skip(why)
    env = arservice_env(service, spec={"type": kind}, interpreter=["bash", "-c"])
    try:
        assert env.config.cwd == "" and env.get_template_vars()["cwd"] == ""
        result = env.execute({"command": "pwd"})
        assert result["returncode"] == 0 and result["output"] != "/\n"
    finally:
        env.cleanup()


# --- mini-swe-agent's DockerEnvironment behaviours, against the shipped class on docker ---

@pytest.fixture
def docker_env(service):
    if why := missing("docker-bookworm"):
        pytest.skip(why)
    made = []

    def make(**config):
        env = arservice_env(service, **{"image": BOOKWORM, "spec": {"pull": "never"}, **config})
        made.append(env)
        return env
    yield make
    for env in made:
        env.cleanup()


def test_env_variables(docker_env):
    env = docker_env(env={"TEST_VAR": "test_value", "ANOTHER_VAR": "another value"})
    assert env.execute({"command": "echo $TEST_VAR; echo \"$ANOTHER_VAR\""})["output"] == "test_value\nanother value\n"


def test_forward_env_is_read_where_the_client_runs(docker_env):
    # The service's agent does not have these: they can only come from this process.
    with patch.dict(os.environ, {"HOST_VAR": "from_host", "CONFLICT_VAR": "from_host"}):
        env = docker_env(env={"SET_VAR": "from_config", "CONFLICT_VAR": "from_config"},
                         forward_env=["HOST_VAR", "CONFLICT_VAR", "NONEXISTENT_VAR"])
    result = env.execute({"command": 'echo "$SET_VAR $HOST_VAR $CONFLICT_VAR [${NONEXISTENT_VAR-unset}]"'})
    assert result["output"] == "from_config from_host from_config [unset]\n"


def test_cwd_default_config_and_override(docker_env):
    assert docker_env().execute({"command": "pwd"})["output"] == "/\n"  # DockerEnvironment's default
    env = docker_env(cwd="/tmp")
    assert env.execute({"command": "pwd"})["output"] == "/tmp\n"
    assert env.execute({"command": "pwd"}, cwd="/usr")["output"] == "/usr\n"
    assert env.execute({"command": "pwd"})["output"] == "/tmp\n"


def test_exit_codes_and_timeout_override(docker_env):
    env = docker_env()
    assert env.execute({"command": "exit 42"}) == {"output": "", "returncode": 42, "exception_info": ""}
    result = env.execute({"command": "echo partial; sleep 10"}, timeout=1)
    assert result["returncode"] == -1 and result["output"] == "partial\n"
    assert result["exception_info"] == ("An error occurred while executing the command: "
                                        "Command 'echo partial; sleep 10' timed out after 1 seconds")
    assert result["extra"]["exception_type"] == "TimeoutExpired"


def test_network_is_there_as_in_mini_unless_the_spec_says_no(docker_env):
    def network_mode(env):
        [container] = backend("docker").client().containers.list(
            filters={"label": f"arservice.instance={env.instance_id}"})
        return container.attrs["HostConfig"]["NetworkMode"]
    # DockerEnvironment's `docker run` joins docker's default network; arservice's own default is none.
    assert network_mode(docker_env()) == "bridge"
    assert network_mode(docker_env(spec={"pull": "never", "network": False})) == "none"


def test_output_is_not_cut_at_the_services_default_limit(docker_env):
    result = docker_env().execute({"command": "head -c 3000000 /dev/zero | tr '\\0' a"})
    assert result["output"] == "a" * 3_000_000  # the service's default keeps 1 MiB; mini keeps all


def test_interpreter_is_a_login_bash_by_default(docker_env):
    assert docker_env().execute({"command": "shopt -q login_shell && echo login"})["output"] == "login\n"
    assert docker_env(interpreter=["bash", "-c"]).execute({"command": "shopt -q login_shell || echo plain"})["output"] == "plain\n"


def test_container_timeout_ends_the_container(docker_env):
    env = docker_env(container_timeout="3s")
    assert env.execute({"command": "echo running"})["output"] == "running\n"
    # Past container_timeout the container is gone: a command is an error observation, as in mini.
    result = wait_for(lambda: (r := env.execute({"command": "true"}))["returncode"] == -1 and r,
                      timeout=30, interval=0.5, what="the container to end")
    assert result["exception_info"].startswith("An error occurred while executing the command: ")


def test_cleanup_removes_the_container_and_the_instance(docker_env, service):
    env = docker_env()
    instance_id = env.instance_id
    assert any(i["instance_id"] == instance_id for i in service.client.instances())
    env.cleanup()
    env.cleanup()  # twice is harmless, as in mini
    assert not any(i["instance_id"] == instance_id and i.get("state") != "closed" for i in service.client.instances())
    client = backend("docker").client()
    assert client.containers.list(all=True, filters={"label": f"arservice.instance={instance_id}"}) == []


def test_submission_check_template_vars_and_serialize(docker_env):
    env = docker_env(env={"A": "1"})
    from minisweagent.exceptions import Submitted
    with pytest.raises(Submitted) as submitted:
        env.execute({"command": "echo '  COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT'; echo diff"})
    assert submitted.value.messages[0]["extra"] == {"exit_status": "Submitted", "submission": "diff\n"}
    # A failing command that prints the marker is not a submission.
    assert env.execute({"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; exit 1"})["returncode"] == 1
    template_vars = env.get_template_vars(extra="x")
    assert template_vars["image"] == BOOKWORM and template_vars["cwd"] == "/" and template_vars["extra"] == "x"
    assert template_vars["system"] == os.uname().sysname and "token" not in template_vars
    serialized = env.serialize()["info"]["config"]
    assert serialized["environment_type"] == CLASS_PATH
    assert serialized["environment"]["image"] == BOOKWORM and "token" not in serialized["environment"]
    json.dumps(serialized)


@skip_unless("podman")
def test_executable_podman_picks_the_podman_backend(service):
    env = arservice_env(service, executable="/usr/bin/podman", image=BUSYBOX, spec={"pull": "never"},
                        interpreter=["sh", "-c"])
    try:
        assert [i["type"] for i in service.client.instances() if i["instance_id"] == env.instance_id] == ["podman"]
        assert env.execute({"command": "echo in podman"})["output"] == "in podman\n"
    finally:
        env.cleanup()


def test_a_timeout_adds_nothing_to_the_output(service):
    """mini's LocalEnvironment kills the command's group at once; the service must not let the shell
    see its child die first and print "Killed" (it did, in about 1 of 10 timeouts under sh)."""
    instance_id = service.client.start_instance({"type": "local", "shell": "sh"})["instance_id"]
    try:
        with ThreadPoolExecutor(10) as pool:
            outputs = list(pool.map(lambda _: service.client.execute(instance_id, "echo started; sleep 5", timeout=0.3),
                                    range(40)))
    finally:
        service.client.close_instance(instance_id)
    assert all(r["timed_out"] for r in outputs)
    # Under load a command may be killed before its echo ran (0.3 s): nothing, or what it printed, never more.
    assert {r["output"] for r in outputs} <= {"started\n", ""} and "started\n" in {r["output"] for r in outputs}


# --- configuration that needs no instance ---

def test_container_timeout_uses_sleeps_syntax():
    assert [sleep_seconds(v) for v in ("90", "1.5m", "2h", "1d", "3s")] == [90, 90, 7200, 86400, 3]
    with pytest.raises(ValueError):
        sleep_seconds("2 hours")


def test_docker_cli_run_args_are_refused_not_ignored():
    with pytest.raises(ValueError, match="spec.run_options"):
        ArserviceEnvironment(address="tcp://127.0.0.1:1", image=BOOKWORM, run_args=["--rm", "--privileged"])


def test_a_misspelt_key_is_an_error():
    with pytest.raises(ValueError, match="adress"):
        ArserviceEnvironment(adress="tcp://127.0.0.1:1", image=BOOKWORM)


def test_a_preset_excludes_the_keys_it_decides():
    with pytest.raises(ValueError, match="image"):
        ArserviceEnvironment(address="tcp://127.0.0.1:1", preset="swe", image=BOOKWORM)


def test_no_capacity_starts_are_retried(tmp_path):
    svc = Service("--runner", "local", "--max-resources", '{"instances": 1}').wait_ready()
    holder = svc.client.start_instance({"type": "local"})["instance_id"]
    # The room the start waits for: the only instance closes a second from now.
    closer = threading.Timer(1.0, svc.client.close_instance, args=(holder,))
    try:
        started = time.monotonic()
        closer.start()
        env = ArserviceEnvironment(address=svc.zmq, token="", spec={"type": "local"},
                                   interpreter=["bash", "-c"], cwd="/tmp", start_wait=30)
        assert time.monotonic() - started >= 0.9  # it waited for the room the close made
        env.cleanup()
        closer.join()
        svc.client.start_instance({"type": "local"})  # the room is there again
        with pytest.raises(ServiceError) as refused:
            ArserviceEnvironment(address=svc.zmq, token="", spec={"type": "local"}, start_wait=0.5)
        assert refused.value.code == "no_capacity"
    finally:
        # A failed test must not leave the timer to ask a stopped service (it would wait 600 s).
        closer.cancel()
        closer.join()
        assert svc.stop() == 0


# --- mini-swe-agent's own runners: `mini` (image from the config) and SWE-bench (image per task) ---

RUNNER_STEPS = ["cat /etc/debian_version >/dev/null && echo in-image", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; echo patch"]


def run_cli(service, tmp_path, argv, environment):
    """Run a mini-swe-agent command line with a config selecting ArserviceEnvironment."""
    config = {
        "agent": {"agent_class": "default", "system_template": SYSTEM, "instance_template": INSTANCE,
                  "step_limit": 5, "cost_limit": 0},
        "environment": {"environment_class": CLASS_PATH, "address": service.zmq, "token": "",
                        "spec": {"pull": "never"}, "timeout": 10, **environment},
        "model": {"model_class": "deterministic", "model_name": "deterministic",
                  "outputs": [make_output(f"step {i}", [{"command": c}]) for i, c in enumerate(RUNNER_STEPS)]},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", *argv, "-c", str(tmp_path / "config.yaml")], check=False,
                          capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, HF_DATASETS_OFFLINE="1", MSWEA_SILENT_STARTUP="1", MSWEA_CONFIGURED="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def assert_ran_in_image(trajectory_file):
    trajectory = json.loads(trajectory_file.read_text())
    assert trajectory["info"]["exit_status"] == "Submitted" and trajectory["info"]["submission"] == "patch\n"
    assert trajectory["info"]["config"]["environment"]["image"] == BOOKWORM
    assert trajectory["info"]["config"]["environment_type"] == CLASS_PATH
    assert trajectory["messages"][3]["extra"]["raw_output"] == "in-image\n"


def swebench_dataset(tmp_path, count):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    tasks = [{"instance_id": f"demo__task-{i}", "problem_statement": f"print {i}", "image_name": BOOKWORM}
             for i in range(count)]
    (dataset / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return dataset, tasks


@skip_unless("docker-bookworm")
def test_mini_single_task_runner_takes_the_image_from_the_config(service, tmp_path):
    run_cli(service, tmp_path, ["minisweagent.run.mini", "-t", "a task", "-y", "--exit-immediately",
                                "-o", str(tmp_path / "out.traj.json")], {"image": BOOKWORM})
    assert_ran_in_image(tmp_path / "out.traj.json")


@skip_unless("docker-bookworm")
def test_swebench_single_runner_passes_the_tasks_image(service, tmp_path):
    dataset, tasks = swebench_dataset(tmp_path, 2)
    run_cli(service, tmp_path, ["arservice.integrations.minisweagent", "swebench-single", "--subset", str(dataset),
                                "--split", "test", "-i", tasks[1]["instance_id"], "-y", "--exit-immediately",
                                "-o", str(tmp_path / "out.traj.json")], {})
    assert_ran_in_image(tmp_path / "out.traj.json")


@skip_unless("docker-bookworm")
def test_swebench_batch_runner_passes_each_tasks_image(service, tmp_path):
    dataset, tasks = swebench_dataset(tmp_path, 3)
    out = tmp_path / "out"
    run_cli(service, tmp_path, ["arservice.integrations.minisweagent", "swebench", "--subset", str(dataset),
                                "--split", "test", "-w", "3", "-o", str(out)], {})
    preds = json.loads((out / "preds.json").read_text())
    assert {k: v["model_patch"] for k, v in preds.items()} == {t["instance_id"]: "patch\n" for t in tasks}
    for task in tasks:
        assert_ran_in_image(out / task["instance_id"] / f"{task['instance_id']}.traj.json")


def test_batch_example_runs_in_one_command():
    """examples/minisweagent_batch.py as a new user runs it: it starts its own service."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "minisweagent_batch.py")
    backend_name = "local" if missing("docker-bookworm") else "docker"
    proc = subprocess.run([sys.executable, example, "--n", "3", "--backend", backend_name], check=False,
                          capture_output=True, text=True, timeout=100, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3/3 submitted" in proc.stdout
    assert proc.stdout.count("FAIL/PASS") == 3  # each rollout saw its test fail, then pass
