"""Warm pools (--pool PRESET=N, or "pools" in the presets file): started ahead, handed out by a
start that names the preset, refilled in the background, giving their room up to other starts."""

import datetime
import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from arservice.client import ServiceError

from backends import SPECS, params
from helpers import Service, wait_for

pytestmark = pytest.mark.timeout(120)

# What a fresh instance looks like from inside: where a command starts, what is there, and its
# environment (less what names the instance itself: the container's hostname, local's process tag).
# (A local instance's /tmp is the host's, which other tests change meanwhile: only where the
# instance has its own, as the exec helper's mount /.arservice tells.)
PROBE = "pwd; ls -A . 2>&1; [ -d /.arservice ] && ls -A /tmp; env | grep -v -e '^HOSTNAME=' -e '^ARSERVICE_INSTANCE=' -e '^PWD=' | sort"


def pooled_service(tmp_path, presets, *args, instances=4):
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(presets))
    return Service("--runner", "local", "--max-resources", json.dumps({"instances": instances}),
                   "--environments", str(path), *args).wait_ready()


def pools(svc):
    return svc.client.available_resources()["pools"]


def pooled_ids(svc):
    return {i["instance_id"] for i in svc.client.instances(state="pooled")}


def probe(client, instance_id):
    result = client.execute(instance_id, PROBE)
    workdir = result["output"].split(b"\n", 1)[0] if isinstance(result["output"], bytes) else result["output"].split("\n", 1)[0]
    # A local instance's working directory is its own: compare what is in it, not its name.
    return result["output"].replace(workdir, "WORKDIR"), result["returncode"]


@pytest.mark.parametrize("name", params("local", "local-fast", "docker-busybox", "podman", "bubblewrap"))
def test_a_start_of_the_preset_gets_a_ready_instance_as_good_as_a_fresh_one(tmp_path, name):
    svc = pooled_service(tmp_path, {"p": SPECS[name], "pools": {"p": 2}})
    try:
        client = svc.client
        wait_for(lambda: pools(svc)["p"]["ready"] == 2, timeout=60, interval=0.1, what="the pool to fill")
        ready = pooled_ids(svc)
        inst = client.start_instance("p")
        assert inst["instance_id"] in ready and inst["environment"] == SPECS[name]
        described = {i["instance_id"]: i for i in client.instances()}[inst["instance_id"]]
        assert described["state"] == "running" and described["commands"] == 0
        # It refills in the background, and the instance it handed out is no more one of its.
        wait_for(lambda: pools(svc)["p"] == {"target": 2, "ready": 2, "starting": 0, "handed_out": 1},
                 timeout=60, interval=0.1, what="the pool to refill")
        assert inst["instance_id"] not in pooled_ids(svc)
        fresh = client.start_instance(SPECS[name])  # an inline spec: never from a pool
        assert fresh["instance_id"] not in ready
        assert probe(client, inst["instance_id"]) == probe(client, fresh["instance_id"])
        for instance_id in (inst["instance_id"], fresh["instance_id"]):
            client.close_instance(instance_id)
    finally:
        assert svc.stop() == 0


def test_pools_give_their_room_to_other_starts_and_take_it_back_when_free(tmp_path):
    svc = pooled_service(tmp_path, {"p": {"type": "local"}}, "--pool", "p=3", instances=3)
    try:
        client = svc.client
        wait_for(lambda: pools(svc)["p"]["ready"] == 3, timeout=30, interval=0.1, what="the pool to fill")
        # The service is full of pooled instances, yet a start of something else gets room at once.
        other = client.start_instance({"type": "local", "env": {"X": "1"}})
        assert client.execute(other["instance_id"], "echo $X")["output"] == "1\n"
        resources = client.available_resources()
        assert resources["used"]["instances"] == 3 and resources["pools"]["p"]["ready"] == 2
        assert resources["instances"]["pooled"] == 2 and resources["instances"]["running"] == 1
        # The room comes back to the pool once it is free again.
        client.close_instance(other["instance_id"])
        wait_for(lambda: pools(svc)["p"]["ready"] == 3, timeout=30, interval=0.1, what="the pool to take the room back")
    finally:
        assert svc.stop() == 0


def test_pooled_instances_answer_no_request_and_show_in_resources_and_metrics(tmp_path):
    svc = pooled_service(tmp_path, {"p": {"type": "local"}, "q": {"type": "local"}, "pools": {"p": 1, "q": 0}})
    try:
        client = svc.client
        wait_for(lambda: pools(svc)["p"]["ready"] == 1, timeout=30, interval=0.1, what="the pool to fill")
        assert pools(svc) == {"p": {"target": 1, "ready": 1, "starting": 0, "handed_out": 0}}  # q=0: no pool
        [pooled] = pooled_ids(svc)
        # Nobody was given its id: it is no instance to anybody's request.
        for call in (lambda: client.execute(pooled, "true"), lambda: client.close_instance(pooled),
                     lambda: client.renew(pooled)):
            with pytest.raises(ServiceError) as err:
                call()
            assert err.value.code == "not_found"
        with urllib.request.urlopen(f"{svc.url}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert 'arservice_warm_pool_instances{preset="p",state="ready"} 1.0' in metrics
        assert 'arservice_warm_pool_instances{preset="p",state="target"} 1.0' in metrics
        assert 'arservice_warm_pool_handouts_total{preset="p"} 0.0' in metrics
        # A start of a preset without a pool is an ordinary start.
        q = client.start_instance("q")
        assert q["instance_id"] != pooled and pooled_ids(svc) == {pooled}
        client.close_instance(q["instance_id"])
    finally:
        assert svc.stop() == 0


def test_a_pool_whose_starts_fail_backs_off(tmp_path):
    broken = {"type": "docker", "image": "local/arservice-no-such-image:test", "pull": "never"}
    svc = pooled_service(tmp_path, {"broken": broken, "pools": {"broken": 1}})
    try:
        def failures():  # when each failed start was logged
            return [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    for line in svc.output().splitlines() if " instance_start_failed " in line]

        first, _, third = wait_for(lambda: len(failures()) >= 3 and failures()[:3], timeout=30, interval=0.2,
                                   what="three failed pool starts")
        # The tries wait 1, then 2 s: the third is at least 3 s after the first, not a tight loop.
        assert (third - first).total_seconds() >= 2.5, (first, third)
        assert svc.client.available_resources()["used"]["instances"] == 0
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize("presets,args,words", [
    ({"p": {"type": "local"}}, ["--pool", "nope=2"], "warm pool of 'nope': no such preset"),
    ({"p": {"type": "local"}}, ["--pool", "p=two"], "--pool 'p=two': want PRESET=N"),
    ({"p": {"type": "local"}, "pools": {"p": -1}}, [], "the pool of 'p' must be a whole number"),
    ({"p": {"type": "local"}, "pools": [1]}, [], "'pools' must map preset names to instance counts"),
])
def test_bad_pool_settings_are_one_line_and_exit_2(tmp_path, presets, args, words):
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(presets))
    result = subprocess.run([sys.executable, "-m", "arservice", "--runner", "local", "--environments", str(path), *args],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.daemon
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (scripts/setup.sh installs it)")
def test_a_pool_fills_the_room_of_slurm_agents(tmp_path):
    """Pools fill the room agents have; on Slurm, --slurm-min-jobs keeps agents for them."""
    path = tmp_path / "presets.json"
    path.write_text(json.dumps({"p": {"type": "local"}, "pools": {"p": 2}}))
    svc = Service("--runner", "slurm", "--max-resources", '{"jobs": 1}', "--slurm-min-jobs", "1",
                  "--slurm-instances", "3", "--environments", str(path)).wait_ready(agents=0)
    job_name = svc.client.available_resources()["runner"]["job_name"]
    try:
        wait_for(lambda: pools(svc)["p"]["ready"] == 2, timeout=60, interval=0.2, what="the pool to fill on the job's agent")
        [agent] = svc.client.available_resources()["agents"]
        assert agent["slurm_job_id"] and agent["instances"] == 2
        inst = svc.client.start_instance("p")
        assert inst["agent_id"] == agent["agent_id"]
        assert svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"] == f"{agent['slurm_job_id']}\n"
        svc.client.close_instance(inst["instance_id"])
    finally:
        assert svc.stop() == 0, svc.output()
        subprocess.run(["scancel", f"--name={job_name}"], check=True)
