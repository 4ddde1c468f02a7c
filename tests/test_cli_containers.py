"""apptainer/singularity and enroot cannot be installed on these machines (see the README).

What is tested here is everything around the tools: the exact command lines built from a spec
(checked against the tools' documented synopses), spec validation, the image cache, the build
retries, and what the service answers when no agent has the tool. Running them for real is not,
but the part they share (the exec helper, its revival, the plain exec without it) runs for real
with bwrap standing in for the tool.
"""

import os
import shutil
import signal

import pytest

from arservice.client import ServiceError
from arservice.environments import backend
from arservice.environments.cli_container import CLIContainerEnvironment
from arservice.environments.extra.bubblewrap import HOST_DIRS, read_only_binds
from arservice.environments.helper import MOUNT

from helpers import Service, wait_for

NAME = "ars-4242-node1-i-0123456789ab"


def make(kind, tmp_path, instance_id="i-0123456789ab", **spec):
    cls = backend(kind)
    env = cls(instance_id, cls.parse_config({"type": kind, **spec}), "agent-1", str(tmp_path))
    env.tool, env.name, env.host_dir = kind, NAME, "/w/h"
    return env


def test_apptainer_instance_is_contained_and_carries_the_limits(tmp_path):
    env = make("apptainer", tmp_path, image="docker://python:3.12", cpus=1.5, memory="2g", pids=64,
               network=False, binds=["/data:/data:ro"])
    assert env.start_argv("/cache/x.sif") == [[
        "apptainer", "instance", "start", "--contain", "--cleanenv", "--writable-tmpfs",
        "--bind", "/w/h:/.arservice", "--bind", "/data:/data:ro", "--net", "--network", "none",
        "--cpus", "1.5", "--memory", "2048m", "--pids-limit", "64", "/cache/x.sif", NAME]]
    assert env.enter_argv(["sh", "-c", "true"]) == ["apptainer", "exec", "--cleanenv", f"instance://{NAME}", "sh", "-c", "true"]
    assert env.stop_argv() == ["apptainer", "instance", "stop", NAME]
    assert env.build_argv("docker://python:3.12", "/cache/x.sif") == ["apptainer", "build", "--force", "/cache/x.sif", "docker://python:3.12"]


def test_singularity_sandbox_can_be_writable_and_shares_the_network_by_default(tmp_path):
    env = make("singularity", tmp_path, image=str(tmp_path), writable=True)
    (argv,) = env.start_argv(str(tmp_path))
    assert argv[:6] == ["singularity", "instance", "start", "--contain", "--cleanenv", "--writable"]
    assert "--net" not in argv and "--cpus" not in argv
    assert env.local_image() == str(tmp_path)  # a sandbox directory is used in place


def test_enroot_command_lines(tmp_path):
    env = make("enroot", tmp_path, image="docker://ubuntu:24.04", root=True, mounts=["/data:/data"])
    assert env.build_argv("docker://ubuntu:24.04", "/c/u.sqsh") == ["enroot", "import", "--output", "/c/u.sqsh", "docker://ubuntu:24.04"]
    assert env.start_argv("/c/u.sqsh") == [["enroot", "create", "--name", NAME, "/c/u.sqsh"]]
    assert env.enter_argv(["sh", "-c", "true"]) == [
        "enroot", "start", "--rw", "--root", "--mount", "/w/h:/.arservice", "--mount", "/data:/data", NAME, "sh", "-c", "true"]
    assert env.stop_argv() == ["enroot", "remove", "--force", NAME]


def test_enroot_refuses_limits_it_cannot_enforce():
    for limit in ({"cpus": 1}, {"memory": 512}, {"pids": 5}, {"network": False}):
        with pytest.raises(ServiceError) as err:
            backend("enroot").parse_config({"type": "enroot", "image": "docker://x", **limit})
        assert err.value.code == "invalid_request" and "cannot enforce" in err.value.message


def test_converted_images_are_cached_by_image_name(tmp_path):
    a = make("apptainer", tmp_path, image="docker://a:1", cache_dir=str(tmp_path / "cache"))
    other_instance = make("apptainer", tmp_path, "i-ba9876543210", image="docker://a:1", cache_dir=str(tmp_path / "cache"))
    assert a.cache_path("docker://a:1") == other_instance.cache_path("docker://a:1")  # shared between instances
    assert a.cache_path("docker://a:1") != a.cache_path("docker://a:2")
    assert a.cache_path("docker://a:1").startswith(str(tmp_path / "cache")) and a.cache_path("docker://a:1").endswith(".sif")
    cached = a.cache_path("docker://a:1")
    os.makedirs(os.path.dirname(cached))
    open(cached, "w").close()
    assert a.local_image() == cached  # present: no build


def test_failed_builds_are_retried_then_reported_and_leave_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = make("enroot", tmp_path, image="docker://never:1", cache_dir=str(cache), build_retries=1)
    env.tool = "false"  # a build command that fails, so the retry path runs for real
    with pytest.raises(ServiceError) as err:
        env.local_image()
    assert err.value.code == "environment_error" and "docker://never:1" in err.value.message
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock"]


def test_missing_image_path_is_a_clear_error(tmp_path):
    env = make("apptainer", tmp_path, image="/no/such/image.sif")
    with pytest.raises(ServiceError) as err:
        env.local_image()
    assert err.value.code == "invalid_request" and "/no/such/image.sif" in err.value.message


@pytest.mark.timeout(60)
def test_service_says_no_agent_runs_them_here():
    if any(backend(kind).available() for kind in ("apptainer", "enroot")):
        pytest.skip("apptainer or enroot is installed here after all: this test is about their absence")
    svc = Service("--runner", "local", "--max-resources", '{"instances": 2}').wait_ready()
    try:
        for spec in ({"type": "apptainer", "image": "docker://debian:12"}, {"type": "enroot", "image": "docker://debian:12"}):
            with pytest.raises(ServiceError) as err:
                svc.client.start_instance(spec)
            assert err.value.code == "no_capacity" and spec["type"] in err.value.message
        assert svc.client.available_resources()["used"]["instances"] == 0
    finally:
        assert svc.stop() == 0


class BwrapStandIn(CLIContainerEnvironment):
    """bwrap as the tool: as with `enroot start`, every enter is a new sandbox (over the host's /usr
    and the rest, read-only) with the instance's helper directory mounted."""
    type = "bwrap-stand-in"
    executables = ("bwrap",)

    def start_argv(self, image_path):
        return []

    def enter_argv(self, argv):
        return [self.tool, *read_only_binds("/", HOST_DIRS), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--bind", self.host_dir, MOUNT, *argv]

    def stop_argv(self):
        return ["true"]


@pytest.mark.daemon  # bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed")
@pytest.mark.parametrize("fast_exec", [True, False])
def test_commands_run_through_a_helper_that_comes_back_or_without_one(tmp_path, fast_exec):
    spec = {"type": BwrapStandIn.type, "image": "/", "fast_exec": fast_exec, "env": {"A": "spec"}}
    env = BwrapStandIn("i-0123456789ab", BwrapStandIn.parse_config(spec), "agent-1", str(tmp_path))
    try:
        assert env.start()["fast_exec"] is fast_exec
        expected = (b"spec command\n/tmp\n", 0)
        result = env.execute('echo "$A $B"; pwd', 10, cwd="/tmp", env={"B": "command"})
        assert (result["output"], result["returncode"]) == expected
        if not fast_exec:
            assert env.helper is None
            with pytest.raises(ServiceError, match="sessions need the exec helper"):
                env.session_dir()
            return
        dead = env.helper_proc.pid
        os.killpg(dead, signal.SIGKILL)
        wait_for(lambda: not env.helper.alive(), timeout=10, what="the helper to end")
        assert env.spawn("true", 10, None, None, 1024) is None  # not on the agent's loop: execute() revives it
        result = env.execute('echo "$A $B"; pwd', 10, cwd="/tmp", env={"B": "command"})
        assert (result["output"], result["returncode"]) == expected
        assert env.helper.alive() and env.helper_proc.pid != dead
    finally:
        env.close()
