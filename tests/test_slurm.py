"""The Slurm runner on a real one-node Slurm (scripts/slurm-up.sh), directly and through a real sshd."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from arservice.client import ServiceError

from helpers import Service, free_port, free_ports, run_in_threads, wait_for

pytestmark = [
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (scripts/setup.sh installs it)"),
    pytest.mark.timeout(180),
]
AGENT_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "sbatch", "agent.sh")


def our_jobs(job_name):
    """SLURM_JOB_ID -> state of the jobs named job_name (a pending element of a job array by its array index)."""
    out = subprocess.run(["squeue", "-h", "-r", f"--name={job_name}", "-o", "%i %A %T"], capture_output=True, text=True,
                         check=True).stdout
    return {(i if state == "PENDING" else a): state for i, a, state in (line.split() for line in out.splitlines())}


def slurm_service(*args, **kwargs):
    svc = Service("--runner", "slurm", *args, **kwargs).wait_ready(agents=0)
    try:
        svc.job_name = svc.client.available_resources()["runner"]["job_name"]
    except BaseException:
        svc.stop()
        raise
    return svc


def stop_and_check_no_jobs(svc):
    job_name = svc.job_name
    output = svc.output()
    try:
        assert svc.stop() == 0, output
        assert our_jobs(job_name) == {}  # stop waits until squeue lists none of them
    finally:
        subprocess.run(["scancel", f"--name={job_name}"], check=True)  # a failed test leaves no job either


def test_pool_grows_with_demand_up_to_jobs_replaces_lost_jobs_and_shuts_down_clean():
    svc = slurm_service("--max-resources", '{"jobs": 2}', "--slurm-instances", "1", "--start-wait", "6")
    try:
        peak = []
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak.append(len(our_jobs(svc.job_name)))
                sampling.wait(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        results = [None] * 3

        def start(i):
            try:
                results[i] = svc.client.start_instance({"type": "local"})
            except ServiceError as exc:
                results[i] = exc

        run_in_threads(start, 3)
        sampling.set()
        sampler.join()
        started = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ServiceError)]
        assert len(started) == 2 and len(refused) == 1, results
        assert refused[0].code == "no_capacity" and "within 6s" in refused[0].message
        assert max(peak) == 2  # grown to `jobs`, and no further

        resources = svc.client.available_resources()
        agents = {a["agent_id"]: a for a in resources["agents"]}
        for inst in started:
            job_id = agents[inst["agent_id"]]["slurm_job_id"]
            # The agent runs inside that job: the command sees the job's own environment.
            assert svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"].strip() == job_id
            assert our_jobs(svc.job_name)[job_id] == "RUNNING"
        runner = wait_for(lambda: (r := svc.client.available_resources()["runner"])["agents_registered"] == 2 and r,
                          what="runner status")
        assert runner["jobs"] == {"running": 2} and runner["capacity"]["registered"] == 2
        assert "slurm jobs: 1 pending" in svc.output() or "slurm jobs: 2 pending" in svc.output()

        # scancel behind the runner's back: the instance is lost, the job replaced.
        victim = started[0]
        victim_job = agents[victim["agent_id"]]["slurm_job_id"]
        # By the id squeue shows (362_0 for an element of an array: its SLURM_JOB_ID may be the array's own id,
        # and scancel of that would end every element).
        [victim_id] = wait_for(lambda: [j["job_id"] for j in svc.client.available_resources()["runner"]["job_list"]
                                        if j["slurm_job_id"] == victim_job], what="the runner to know the job")
        subprocess.run(["scancel", victim_id], check=True)

        def lost():
            try:
                svc.client.execute(victim["instance_id"], "true")
            except ServiceError as exc:
                return exc.code == "agent_lost"
        wait_for(lost, timeout=30, interval=0.2, what="the instance on the cancelled job to be lost")
        replaced = wait_for(lambda: [a for a in svc.client.available_resources()["agents"]
                                     if a["slurm_job_id"] not in (victim_job, agents[started[1]["agent_id"]]["slurm_job_id"])],
                            timeout=60, interval=0.2, what=f"a replacement job's agent: {svc.output()}")
        assert replaced[0]["slurm_job_id"] in our_jobs(svc.job_name)
        assert wait_for(lambda: svc.client.available_resources()["runner"]["lost"], what="lost count") == 1
        assert svc.client.execute(started[1]["instance_id"], "echo still")["output"] == "still\n"
    finally:
        stop_and_check_no_jobs(svc)


def test_idle_agents_are_released_down_to_the_minimum():
    svc = slurm_service("--max-resources", '{"jobs": 2}', "--slurm-instances", "1", "--slurm-min-jobs", "1",
                        "--slurm-idle-timeout", "1")
    try:
        wait_for(lambda: len(svc.client.available_resources()["agents"]) == 1, timeout=60, what="the minimum job's agent")
        insts = [svc.client.start_instance({"type": "local"}) for _ in range(2)]
        assert len(our_jobs(svc.job_name)) == 2
        for inst in insts:
            svc.client.close_instance(inst["instance_id"])
        wait_for(lambda: len(our_jobs(svc.job_name)) == 1, timeout=30, interval=0.2, what="one idle job released")
        runner = svc.client.available_resources()["runner"]
        assert runner["released"] == 1 and runner["lost"] == 0
        # The job kept is the minimum pool: still serving.
        inst = svc.client.start_instance({"type": "local"})
        assert svc.client.execute(inst["instance_id"], "echo ok")["output"] == "ok\n"
    finally:
        stop_and_check_no_jobs(svc)


def test_a_job_whose_sbatch_answer_was_lost_is_adopted_and_cancelled_at_stop():
    svc = slurm_service("--max-resources", '{"jobs": 2}', "--slurm-instances", "1", token="tok")
    try:
        # What an sbatch that ran but whose answer never came back leaves: a job with our name.
        env = dict(os.environ, ARSERVICE_PYTHON=sys.executable, ARSERVICE_TOKEN="tok")
        job_id = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", f"--job-name={svc.job_name}",
                                 AGENT_SCRIPT, "--broker", svc.zmq, "--instances", "1"],
                                capture_output=True, text=True, check=True, env=env).stdout.strip()
        runner = wait_for(lambda: (r := svc.client.available_resources()["runner"])["agents_registered"] == 1 and r,
                          timeout=60, interval=0.2, what="the adopted job's agent")
        assert [j["job_id"] for j in runner["job_list"]] == [job_id] and runner["submitted"] == 0
        assert "job_adopted" in svc.output()
        # It counts as the pool's own: the first start lands on it, nothing more is submitted.
        inst = svc.client.start_instance({"type": "local"})
        assert svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"].strip() == job_id
        assert list(our_jobs(svc.job_name)) == [job_id]
    finally:
        stop_and_check_no_jobs(svc)  # adopted, so cancelled with the rest


def test_crashed_service_leaves_no_job_behind():
    svc = slurm_service("--max-resources", '{"jobs": 1}', "--slurm-min-jobs", "1")
    job_name = svc.job_name
    try:
        wait_for(lambda: svc.client.available_resources()["agents"], timeout=60, interval=0.2, what="the agent")
        svc.proc.kill()  # SIGKILL: the runner gets no chance to scancel
        svc.proc.wait()
        # The agent hears nothing from its broker for --broker-timeout (15 s), cleans up and exits,
        # and with it the job.
        wait_for(lambda: our_jobs(job_name) == {}, timeout=60, interval=0.5, what="the orphaned job to end")
    finally:
        svc.stop()
        subprocess.run(["scancel", f"--name={job_name}"], check=True)  # a failed test leaves no job either


def test_sbatch_by_hand_joins_a_running_broker():
    svc = Service("broker", token="s3cret").wait_ready(agents=0)
    job_id = None
    try:
        env = dict(os.environ, ARSERVICE_PYTHON=sys.executable, ARSERVICE_TOKEN="s3cret", ARSERVICE_INSTANCES="2")
        job_id = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--cpus-per-task=2", "--mem=1000",
                                 AGENT_SCRIPT, "--broker", svc.zmq],
                                capture_output=True, text=True, check=True, env=env).stdout.strip()
        [agent] = wait_for(lambda: svc.client.available_resources()["agents"], timeout=60, what="the agent to register")
        # Capacity from the allocation: instances from the environment, CPUs and memory from Slurm.
        assert agent["slurm_job_id"] == job_id
        assert agent["capacity"] == {"instances": 2, "cpus": 2, "memory": 1000}
        inst = svc.client.start_instance({"type": "local"})
        assert svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"].strip() == job_id
    finally:
        if job_id:
            subprocess.run(["scancel", job_id], check=True)
        svc.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    sshd_bin = "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin):
        pytest.skip("openssh-server is not installed (scripts/setup.sh installs it)")
    home = tmp_path_factory.mktemp("ssh")
    for name in ("good", "wrong"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "good.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
                             "-o", f"AuthorizedKeysFile={home}/authorized_keys", "-o", "StrictModes=no",
                             "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
                             "-o", "PidFile=none"], stderr=subprocess.DEVNULL)
    wait_for(lambda: subprocess.run(["ssh-keyscan", "-p", str(port), "127.0.0.1"], capture_output=True, check=False).stdout,
             timeout=10, what="sshd to listen")
    yield {"port": port, "good": str(home / "good"), "wrong": str(home / "wrong"), "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=10)


def ssh_args(sshd, key):
    return ["--slurm-ssh", "root@127.0.0.1", "--slurm-ssh-port", str(sshd["port"]), "--slurm-ssh-key", sshd[key],
            "--slurm-python", sys.executable]


def test_submission_through_ssh_to_a_login_node(sshd):
    svc = slurm_service("--max-resources", '{"jobs": 1}', *ssh_args(sshd, "good"), token="tok")
    try:
        assert svc.client.available_resources()["runner"]["submit_on"] == f"root@127.0.0.1:{sshd['port']}"
        inst = svc.client.start_instance({"type": "local"})
        job_id = svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"].strip()
        assert our_jobs(svc.job_name) == {job_id: "RUNNING"}
        # The script and the secret were copied to the login node's home; the secret is private.
        token_file = os.path.expanduser(f"~/.arservice/slurm/{svc.job_name}/token")
        assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
    finally:
        stop_and_check_no_jobs(svc)
    assert not os.path.exists(token_file)


def test_a_dropped_ssh_connection_is_reopened(sshd):
    svc = slurm_service("--max-resources", '{"jobs": 2}', "--slurm-instances", "1", *ssh_args(sshd, "good"), token="tok")
    try:
        svc.client.start_instance({"type": "local"})
        # Kill the sshd processes serving the runner's connection (the listener stays).
        sessions = subprocess.run(["pgrep", "-P", str(sshd["pid"])], capture_output=True, text=True, check=False).stdout.split()
        assert sessions
        for pid in sessions:
            os.kill(int(pid), signal.SIGKILL)
        inst = svc.client.start_instance({"type": "local"})  # needs a second sbatch, so a new connection
        job_id = svc.client.execute(inst["instance_id"], "echo $SLURM_JOB_ID")["output"].strip()
        assert job_id in our_jobs(svc.job_name) and len(our_jobs(svc.job_name)) == 2
        assert "ssh_retry" in svc.output()
    finally:
        stop_and_check_no_jobs(svc)


def test_a_wrong_ssh_key_fails_fast_with_a_clear_message(sshd):
    http_port, zmq_port = free_ports(2)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "arservice", "--runner", "slurm", "--port", str(http_port),
                           "--zmq-port", str(zmq_port), *ssh_args(sshd, "wrong")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"arservice: error: ssh root@127.0.0.1:{sshd['port']}: authentication failed with key {sshd['wrong']}" in done.stderr
    assert time.monotonic() - started < 20  # not retried: retries would take 15 s of backoff alone


@pytest.mark.parametrize("args, error", [
    (["--slurm-env", "PYTHONPATH"], "--slurm-env 'PYTHONPATH': want NAME=VALUE"),
    (["--slurm-env", "-i=x"], "--slurm-env '-i=x': want NAME=VALUE"),  # (it goes to `env` before sbatch)
    (["--slurm-time", "1", "--slurm-time-margin", "60"], "--slurm-time-margin (60s) must be less than --slurm-time (60s)"),
    (["--slurm-job-prefix", "../../x"], "--slurm-job-prefix: use letters, digits"),
])
def test_bad_slurm_options_are_refused_before_anything_starts(args, error):
    done = subprocess.run([sys.executable, "-m", "arservice", "--runner", "slurm", "--port", "0", "--zmq-port", "0", *args],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and error in done.stderr, done.stderr
