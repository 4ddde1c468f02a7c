"""The Slurm runner on a real three-node cluster (scripts/slurm-multinode.sh): the broker on the
cluster's bridge, agents on nodes n1-n3 dialing it, jobs submitted over SSH on the login node;
then a node dies, jobs reach their time limit, get requeued or preempted, and the login node falls silent."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.client import HTTPClient, ServiceError, ZMQClient
from arservice.runners.slurm import slurm_seconds

from helpers import Service, run_in_threads, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "slurm-multinode.sh")
BASE = "/tmp/arservice-mn"
SLURM_ENV = dict(os.environ, SLURM_CONF=f"{BASE}/etc/slurm.conf")
BRIDGE = "10.77.0.1"
LOGIN = "root@10.77.0.20"
KEY = f"{BASE}/ssh/id_ed25519"
NODES = ("n1", "n2", "n3")

pytestmark = [
    pytest.mark.skipif(not all(shutil.which(c) for c in ("sbatch", "slurmd", "slurmctld", "nsenter", "ip")),
                       reason="Slurm or iproute2 is not installed (scripts/setup.sh installs them)"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="openssh-server is not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the cluster's network namespaces need root"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="session")
def cluster():
    subprocess.run([CLUSTER, "up"], check=True, timeout=60)
    yield
    subprocess.run([CLUSTER, "down"], check=True, timeout=60)


class ClusterService(Service):
    """`arservice --runner slurm` bound on the cluster's bridge, submitting through the login node."""

    def __init__(self, *args, token="tok"):
        super().__init__("--runner", "slurm", "--host", BRIDGE, "--slurm-ssh", LOGIN, "--slurm-ssh-key", KEY,
                         "--slurm-python", sys.executable, "--slurm-env", f"PYTHONPATH={ROOT}", *args, token=token)
        self.client.close()
        self.zmq = f"tcp://{BRIDGE}:{self.zmq_port}"
        self.url = f"http://{BRIDGE}:{self.http_port}"
        self.client = ZMQClient(self.zmq, token=token)
        self.http = HTTPClient(self.url, token=token)
        self.wait_ready(agents=0)  # stops the service if it never gets ready
        try:
            self.job_name = self.client.available_resources()["runner"]["job_name"]
        except BaseException:
            self.stop()
            raise

    def runner(self):
        return self.client.available_resources()["runner"]

    def terminate(self, *signals, bound=20):
        """Send the signals (a second one 0.5 s after the first), wait at most `bound` s for the exit;
        return (exit code, seconds from the first signal, what it printed)."""
        started = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.5)  # the second signal must come while the first stop is under way
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"arservice did not exit within {bound}s:\n{self.output()}") from None
        return code, time.monotonic() - started, self.output()

    def cleanup(self):
        self.stop()
        subprocess.run(["scancel", f"--name={self.job_name}"], env=SLURM_ENV, check=False)


def our_jobs(job_name):
    """SLURM_JOB_ID -> (state, node) for the jobs named job_name (a pending element of a job array by its array index)."""
    out = subprocess.run(["squeue", "-h", "-r", f"--name={job_name}", "-o", "%i|%A|%T|%N"], capture_output=True, text=True,
                         check=True, env=SLURM_ENV).stdout
    return {(i if state == "PENDING" else a): (state, node)
            for i, a, state, node in (line.split("|") for line in out.splitlines())}


def agents_by_job(svc):
    agents = {}
    for agent in svc.client.available_resources()["agents"]:
        agents.setdefault(agent["slurm_job_id"], []).append(agent)
    return agents


def is_lost(svc, instance_id):
    try:
        svc.client.execute(instance_id, "true")
    except ServiceError as exc:
        return exc.code == "agent_lost"
    return False


def test_slurm_durations_as_sbatch_takes_and_squeue_prints_them():
    assert [slurm_seconds(t) for t in ("5", "5:30", "1:02:03", "2-3", "2-3:04", "2-03:04:05", "UNLIMITED", "NOT_SET")] == \
        [300, 330, 3723, 183600, 183840, 183845, None, None]


def test_spread_over_nodes_a_dead_node_is_replaced_elsewhere_and_stop_is_bounded(cluster):
    svc = ClusterService("--max-resources", '{"jobs": 3}', "--slurm-instances", "4", "--stop-timeout", "4")
    victim_node = None
    try:
        insts = [None] * 12

        def start(i):
            insts[i] = svc.client.start_instance({"type": "local"})
        run_in_threads(start, 12)
        hosts = {i["instance_id"]: svc.client.execute(i["instance_id"], "hostname")["output"].strip() for i in insts}
        assert sorted(hosts.values()) == sorted(NODES * 4)  # 4 on each node, each in its own namespace
        # The runner's SSH session stays out of the instances (bash would take it as a reason to source ~/.bashrc).
        assert svc.client.execute(insts[0]["instance_id"], "echo ${SSH_CLIENT:-none}")["output"] == "none\n"
        runner = wait_for(lambda: (r := svc.runner())["agents_registered"] == 3 and r, what="runner status")
        assert {n: v["instances"] for n, v in runner["nodes"].items()} == dict.fromkeys(NODES, 4)
        assert sorted(a["hostname"] for a in svc.http.available_resources()["agents"]) == list(NODES)

        # n? dies: slurmd, the job's agent and its instances, all at once. Slurm does not notice for minutes.
        victim_node = hosts[insts[0]["instance_id"]]
        [victim_job] = [j for j, (_, node) in our_jobs(svc.job_name).items() if node == victim_node]
        old_jobs = set(agents_by_job(svc))
        killed = time.monotonic()
        subprocess.run([CLUSTER, "kill-node", victim_node], check=True, timeout=30)
        on_victim = [i for i, h in hosts.items() if h == victim_node]
        wait_for(lambda: all(is_lost(svc, i) for i in on_victim), timeout=10, interval=0.1, what="its instances lost")
        lost_after = time.monotonic() - killed

        def replacement():
            return [(j, node) for j, (state, node) in our_jobs(svc.job_name).items()
                    if j not in old_jobs and state == "RUNNING"]
        [(new_job, new_node)] = wait_for(replacement, timeout=10, interval=0.1, what="a replacement job RUNNING")
        replaced_after = time.monotonic() - killed
        assert new_node != victim_node and lost_after < 10 and replaced_after < 10, (lost_after, replaced_after)
        # The rest keeps working; the replacement's agent registers; no job runs two agents.
        for inst, host in hosts.items():
            if host != victim_node:
                assert svc.client.execute(inst, "echo ok")["output"] == "ok\n"
        wait_for(lambda: new_job in agents_by_job(svc), timeout=20, interval=0.1, what="the replacement's agent")
        assert all(len(a) == 1 for a in agents_by_job(svc).values()) and victim_job not in agents_by_job(svc)
        runner = svc.runner()
        assert runner["lost"] == 1 and runner["excluded_nodes"] == [victim_node], svc.output()

        # Stop while the node is dead: its job never leaves squeue, so stop gives up after --stop-timeout.
        [victim_id] = [j["job_id"] for j in svc.runner()["job_list"] if j["slurm_job_id"] == victim_job]  # 40_1 in an array
        code, took, output = svc.terminate(signal.SIGTERM)
        assert code == 1 and took < 4 + 5, (code, took, output)
        assert f"could not confirm that Slurm job(s) {victim_id} ended" in output
        assert f"end them with: ssh -i {KEY} -p 22 {LOGIN} 'scancel {victim_id}'" in output
        assert {j: s for j, s in our_jobs(svc.job_name).items() if s[1] != victim_node} == {}  # nothing on live nodes
    finally:
        svc.cleanup()
        if victim_node:
            subprocess.run([CLUSTER, "revive-node", victim_node], check=True, timeout=30)


def test_stop_with_the_login_node_unreachable_is_bounded_and_names_the_jobs(cluster):
    svc = ClusterService("--max-resources", '{"jobs": 2}', "--slurm-min-jobs", "2", "--slurm-instances", "1",
                         "--slurm-command-timeout", "2")
    link_down = False
    try:
        wait_for(lambda: len(agents_by_job(svc)) == 2, timeout=30, interval=0.1, what="two agents")
        jobs = [j["job_id"] for j in svc.runner()["job_list"]]  # as the runner knows them
        assert [j.split("_")[1] for j in jobs] == ["0", "1"]  # submitted together: one job array
        # The login node falls silent: its link drops packets, so SSH calls hang instead of failing.
        subprocess.run(["ip", "link", "set", "mn-login", "down"], check=True)
        link_down = True
        # Every Slurm call is bounded: the runner's squeue gives up with a clear error, and tries again.
        wait_for(lambda: f"ssh {LOGIN}:22: squeue: no answer within 2s" in svc.output(), timeout=15, interval=0.2,
                 what="the bounded squeue's error")
        code, took, output = svc.terminate(signal.SIGTERM, signal.SIGTERM)  # the second one forces the stop
        assert code == 1 and took < 5, (code, took, output)  # well before --stop-timeout (30 s)
        assert f"could not confirm that Slurm job(s) {' '.join(jobs)} ended" in output
        line = f"ssh -i {KEY} -p 22 {LOGIN} 'scancel {' '.join(jobs)}'"
        assert f"end them with: {line}" in output
        subprocess.run(["ip", "link", "set", "mn-login", "up"], check=True)
        link_down = False
        # The printed line is the one to run: it ends them (this cluster's host key is new each time).
        ssh, *rest = shlex.split(line)
        subprocess.run([ssh, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                        *rest], check=True, timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
        wait_for(lambda: not our_jobs(svc.job_name), timeout=20, interval=0.2, what="the jobs to end")
    finally:
        if link_down:
            subprocess.run(["ip", "link", "set", "mn-login", "up"], check=True)
        svc.cleanup()


@pytest.mark.parametrize("evicted_by", ["scontrol requeue", "preemption"])
def test_a_requeued_or_preempted_job_is_replaced_without_a_duplicate_agent(cluster, evicted_by):
    svc = ClusterService("--max-resources", '{"jobs": 2}', "--slurm-instances", "1")
    urgent = f"{svc.job_name}-urgent"
    try:
        inst = svc.client.start_instance({"type": "local"})
        [(job_id, _)] = agents_by_job(svc).items()
        [(squeue_id, node)] = wait_for(lambda: [(j["job_id"], j["node"]) for j in svc.runner()["job_list"]
                                                if j["slurm_job_id"] == job_id and j["node"]],
                                       what="the runner to know the job")
        evicted = time.monotonic()
        if evicted_by == "preemption":
            # A job of the higher-priority partition that needs the whole node: Slurm requeues ours.
            subprocess.run(["sbatch", "-Q", "-p", "urgent", "-J", urgent, "-w", node, "--exclusive", "-o", "/dev/null",
                            "--wrap", "sleep 120"], check=True, env=SLURM_ENV)
        else:
            subprocess.run(["scontrol", "requeue", squeue_id], check=True, env=SLURM_ENV)
        wait_for(lambda: is_lost(svc, inst["instance_id"]), timeout=10, interval=0.1, what="the instance lost")
        lost_after = time.monotonic() - evicted
        # The requeued job is cancelled, not run again beside its replacement.
        wait_for(lambda: job_id not in our_jobs(svc.job_name), timeout=30, interval=0.1, what="the requeued job gone")
        inst = svc.client.start_instance({"type": "local"})
        agents = agents_by_job(svc)
        assert job_id not in agents and [len(a) for a in agents.values()] == [1]
        assert list(our_jobs(svc.job_name)) == list(agents)
        assert svc.client.execute(inst["instance_id"], "echo ok")["output"] == "ok\n"
        runner = svc.runner()
        assert runner["lost"] == 1 and runner["excluded_nodes"] == []  # Slurm ended it: the node is fine
        if evicted_by == "preemption":  # the node is the urgent job's now: the replacement runs elsewhere
            assert all(n != node for _, n in our_jobs(svc.job_name).values()) and lost_after < 5, lost_after
        code, _, output = svc.terminate(signal.SIGTERM)
        assert code == 0, output
        assert our_jobs(svc.job_name) == {}
    finally:
        svc.cleanup()
        subprocess.run(["scancel", f"--name={urgent}"], env=SLURM_ENV, check=False)


def test_a_job_requeued_between_two_looks_of_the_runner_is_lost_too(cluster):
    # The runner looks at squeue once a second, and under load a job can start, register its agent,
    # be requeued and be pending again in between (CI saw it). Here the service is stopped meanwhile:
    # it never sees the job run, only pending again, with its restart count up.
    svc = ClusterService("--max-resources", '{"jobs": 1}', "--slurm-instances", "1",
                         "--slurm-sbatch-arg=--hold")  # held: a job runs only when the test releases it
    starter, client = ThreadPoolExecutor(1), ZMQClient(svc.zmq, token="tok")  # (a client per thread)
    try:
        started = starter.submit(client.start_instance, {"type": "local"}, wait_s=60)
        [job_id] = wait_for(lambda: [j["job_id"] for j in svc.runner()["job_list"]], what="the job submitted")
        svc.proc.send_signal(signal.SIGSTOP)
        try:
            subprocess.run(["scontrol", "release", job_id], check=True, env=SLURM_ENV)
            wait_for(lambda: our_jobs(svc.job_name).get(job_id, ("",))[0] == "RUNNING", timeout=20, interval=0.1,
                     what="the job running")
            subprocess.run(["scontrol", "requeue", job_id], check=True, env=SLURM_ENV)
            wait_for(lambda: our_jobs(svc.job_name).get(job_id, ("",))[0] == "PENDING", timeout=40, interval=0.1,
                     what="the job pending again")
        finally:
            svc.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: job_id not in our_jobs(svc.job_name), timeout=10, interval=0.1, what="the requeued job gone")
        [new_job] = wait_for(lambda: list(our_jobs(svc.job_name)), timeout=10, interval=0.1, what="a replacement")
        subprocess.run(["scontrol", "release", new_job], check=True, env=SLURM_ENV)
        inst = started.result(timeout=30)  # the start that waited all along is served by the replacement
        assert list(agents_by_job(svc)) == [new_job] and svc.client.execute(inst["instance_id"], "echo ok")["output"] == "ok\n"
        assert svc.runner()["lost"] == 1
        code, _, output = svc.terminate(signal.SIGTERM)
        assert code == 0 and our_jobs(svc.job_name) == {}, output
    finally:
        svc.cleanup()
        starter.shutdown(wait=False)
        client.close()


def test_several_agents_in_one_job(cluster):
    svc = ClusterService("--max-resources", '{"jobs": 1}', "--slurm-agents-per-job", "2", "--slurm-instances", "1",
                         "--slurm-cpus", "1", "--slurm-env", "MN_LIST=a,b")
    try:
        insts = [svc.client.start_instance({"type": "local"}) for _ in range(2)]
        [(job_id, agents)] = agents_by_job(svc).items()
        assert len(agents) == 2 and {a["capacity"]["cpus"] for a in agents} == {1}
        assert {i["agent_id"] for i in insts} == {a["agent_id"] for a in agents}  # one instance on each
        # --slurm-env reaches the agents (sbatch's environment, handed on by --export=ALL) and their instances.
        assert [svc.client.execute(i["instance_id"], "echo $PYTHONPATH $MN_LIST")["output"] for i in insts] == [f"{ROOT} a,b\n"] * 2
        assert list(our_jobs(svc.job_name)) == [job_id]
        wait_for(lambda: svc.runner()["capacity"]["registered"] == 2, interval=0.1, what="the runner counting both agents")
    finally:
        svc.cleanup()


def test_jobs_near_their_time_limit_are_drained_and_replaced_before_the_end(cluster):
    # 60 s jobs: agents take nothing new from 50 s before the end; held instances go 25 s before it.
    svc = ClusterService("--max-resources", '{"jobs": 2}', "--slurm-min-jobs", "2", "--slurm-instances", "1",
                         "--slurm-time", "1", "--slurm-time-margin", "50")
    try:
        wait_for(lambda: len(agents_by_job(svc)) == 2, timeout=30, interval=0.1, what="two agents")
        started = time.monotonic()
        held, closed = (svc.client.start_instance({"type": "local"}) for _ in range(2))
        old_jobs = set(agents_by_job(svc))
        wait_for(lambda: all(j["draining"] for j in svc.runner()["job_list"] if j["slurm_job_id"] in old_jobs),
                 timeout=20, interval=0.1, what="the jobs draining")
        # Replacements come while the old agents still serve: capacity does not dip.
        wait_for(lambda: len(set(agents_by_job(svc)) - old_jobs) == 2, timeout=20, interval=0.1, what="replacements")
        assert svc.client.execute(held["instance_id"], "echo still")["output"] == "still\n"
        fresh = svc.client.start_instance({"type": "local"})
        assert fresh["agent_id"] not in {held["agent_id"], closed["agent_id"]}  # nothing new on a draining agent
        # A draining job whose agent holds nothing ends at once...
        closed_job = next(j for j, agents in agents_by_job(svc).items() if agents[0]["agent_id"] == closed["agent_id"])
        svc.client.close_instance(closed["instance_id"])
        wait_for(lambda: closed_job not in our_jobs(svc.job_name), timeout=10, interval=0.1, what="the idle draining job to end")
        # ...one that holds an instance ends half the margin before its limit: the instance is reported lost in time.
        wait_for(lambda: is_lost(svc, held["instance_id"]), timeout=40, interval=0.2, what="the held instance reported")
        assert time.monotonic() - started < 60 - 20
        runner = svc.runner()  # (the replacements are 60 s jobs too: they drain in turn)
        assert runner["drained"] >= 2 and runner["lost"] == 0
    finally:
        svc.cleanup()
