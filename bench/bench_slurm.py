"""Slurm: how long the service takes to bring agents up, against Slurm itself, in one run.

    python bench/bench_slurm.py [--rounds 9]                 one node (scripts/slurm-up.sh)
    python bench/bench_slurm.py --multinode [--rounds 5]     three nodes (scripts/slurm-multinode.sh, brought up here)

One node, target (issue 4): from start_instance on an empty pool to the first command's output,
the service adds at most 1 s to what Slurm itself takes (sbatch to RUNNING). Rounds alternate
raw and service, so machine drift hits both alike. Phases of a service round: submit
(start_instance until the job is in squeue), queue (until RUNNING), agent (until the agent
registered), environment (until start_instance returned), command (until the first output).

Three nodes, target (issue 19): from 24 waiting starts on an empty pool (3 jobs of 8 instances,
submitted over SSH on the login node) to all 24 answered, at most 1 s more than raw sbatch of
3 jobs to RUNNING (also over SSH); and throughput of `true` commands over 6 instances spread
on 3 nodes against 6 on 1 node (the nodes share this machine's cores: this measures the
service's overhead across nodes, not more hardware).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_slurm_multinode as mn

from arservice.client import ZMQClient

from helpers import Service, run_in_threads, wait_for

POLL_S = 0.02


def squeue(args):
    out = subprocess.run(["squeue", "-h", *args, "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def wait_node_idle():
    """Start every round on an idle node (a job still being torn down delays the next one's launch),
    at a random phase of slurmctld's once-a-second scheduling pass: jobs are allocated on its ticks,
    so rounds that always started at the same phase would measure the phase, not the service."""
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False).stdout.split() == ["idle"],
             timeout=120, interval=0.05, what="the node to be idle")
    time.sleep(random.uniform(0, 1))  # sampling jitter, not synchronisation


def raw_round(marker):
    """Seconds from sbatch to RUNNING, and to the job's script actually running (it creates `marker`)."""
    wait_node_idle()
    started = time.monotonic()
    job_id = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", f"touch {marker}; sleep 60"],
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: squeue(["-j", job_id]).get(job_id) == "RUNNING", timeout=120, interval=POLL_S, what="raw job")
    running = time.monotonic() - started
    wait_for(lambda: os.path.exists(marker), timeout=120, interval=POLL_S, what="raw job script")
    script = time.monotonic() - started
    os.unlink(marker)
    subprocess.run(["scancel", job_id], check=True)
    wait_for(lambda: job_id not in squeue(["-j", job_id]), timeout=60, interval=0.1, what="raw job gone")
    return running, script


def service_round(svc, job_name):
    marks = {}
    done = threading.Event()

    def watch():  # phase marks from the outside, as a user would see them
        while not done.is_set():
            now = time.monotonic()
            states = squeue([f"--name={job_name}"])
            if states and "queued" not in marks:
                marks["queued"] = now
            if "RUNNING" in states.values() and "running" not in marks:
                marks["running"] = now
            done.wait(POLL_S)

    watcher = threading.Thread(target=watch)
    wait_node_idle()
    t0 = time.monotonic()
    watcher.start()
    inst = svc.client.start_instance({"type": "local"})
    marks["started"] = time.monotonic()
    [agent] = svc.client.available_resources()["agents"]
    marks["registered"] = time.monotonic() - agent["registered_s"]  # as the broker saw it
    svc.client.execute(inst["instance_id"], "echo hi")
    marks["output"] = time.monotonic()
    done.set()
    watcher.join()
    svc.client.close_instance(inst["instance_id"])
    # Back to an empty pool: the idle agent is released and its job ends.
    wait_for(lambda: not squeue([f"--name={job_name}"]) and not svc.client.available_resources()["agents"],
             timeout=60, interval=0.1, what="the pool to empty")
    return {k: v - t0 for k, v in marks.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 9, 5 with --multinode)")
    parser.add_argument("--multinode", action="store_true", help="on the three-node cluster")
    args = parser.parse_args()
    if args.multinode:
        multinode(args.rounds or 5)
    else:
        one_node(args.rounds or 9)


def one_node(count):
    svc = Service("--runner", "slurm", "--max-resources", '{"jobs": 1}', "--slurm-idle-timeout", "0.5",
                  "--log-level", "WARNING").wait_ready(agents=0)
    try:
        job_name = svc.client.available_resources()["runner"]["job_name"]
        raw, rounds = [], []
        marker = os.path.join(os.path.expanduser("~"), f".arservice-bench-{os.getpid()}")
        for _ in range(count):
            raw.append(raw_round(marker))
            rounds.append(service_round(svc, job_name))
    finally:
        svc.stop()
    med = {k: statistics.median(r[k] for r in rounds) for k in ("queued", "running", "registered", "started", "output")}
    raw_p50 = statistics.median(r[0] for r in raw)
    raw_script = statistics.median(r[1] for r in raw)
    print(f"\nempty Slurm pool to first output, median of {count} rounds (s)")
    print(f"{'raw sbatch --wrap to RUNNING':44} {raw_p50:7.3f}")
    print(f"{'raw sbatch --wrap to its script running':44} {raw_script:7.3f}")
    print(f"{'service: start_instance to job in squeue':44} {med['queued']:7.3f}")
    print(f"{'service: ... to job RUNNING':44} {med['running']:7.3f}   (Slurm: {med['running'] - med['queued']:.3f})")
    print(f"{'service: ... to agent registered':44} {med['registered']:7.3f}   (agent start: {med['registered'] - med['running']:.3f})")
    print(f"{'service: ... to start_instance answered':44} {med['started']:7.3f}   (environment: {med['started'] - med['registered']:.3f})")
    print(f"{'service: ... to first output':44} {med['output']:7.3f}   (command: {med['output'] - med['started']:.3f})")
    print(f"\nadded by the service over raw sbatch to RUNNING: {med['output'] - raw_p50:.3f} s (target <= 1 s); "
          f"ratio {med['output'] / raw_p50:.2f}")
    print(f"added over raw sbatch to its script running: {med['output'] - raw_script:.3f} s")


# -- three nodes --------------------------------------------------------------------

def login_shell(command):
    """A command on the login node, as the runner runs it (one SSH connection per call here)."""
    return subprocess.run(["ssh", "-i", mn.KEY, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", mn.LOGIN, command],
                          capture_output=True, text=True, check=True, timeout=60, stdin=subprocess.DEVNULL).stdout


def mn_jobs(args):
    out = subprocess.run(["squeue", "-h", *args, "-o", "%i %T %N"], capture_output=True, text=True, check=True,
                         env=mn.SLURM_ENV).stdout
    return {f[0]: f[1:] for f in (line.split() for line in out.splitlines())}


def mn_idle():
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False,
                                    env=mn.SLURM_ENV).stdout.split() == ["idle"],
             timeout=120, interval=0.05, what="the nodes to be idle")
    time.sleep(random.uniform(0, 1))  # a random phase of the scheduler's pass (see wait_node_idle)


def mn_raw_round():
    """Seconds from submitting 3 jobs on the login node (one SSH session) to all 3 RUNNING."""
    mn_idle()
    started = time.monotonic()
    ids = login_shell("for i in 1 2 3; do sbatch --parsable -o /dev/null --wrap 'sleep 60'; done").split()
    wait_for(lambda: [s[0] for s in mn_jobs(["-j", ",".join(ids)]).values()] == ["RUNNING"] * 3,
             timeout=120, interval=POLL_S, what="raw jobs")
    took = time.monotonic() - started
    subprocess.run(["scancel", *ids], check=True, env=mn.SLURM_ENV)
    wait_for(lambda: not mn_jobs(["-j", ",".join(ids)]), timeout=60, interval=0.1, what="raw jobs gone")
    return took


def mn_service_round(svc):
    """Seconds from 24 starts to: all 3 jobs RUNNING, all 3 agents registered, all 24 answered; nodes used."""
    mn_idle()
    marks = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            states = [s[0] for s in mn_jobs([f"--name={svc.job_name}"]).values()]
            if states.count("RUNNING") == 3 and "running" not in marks:
                marks["running"] = time.monotonic()
            done.wait(POLL_S)

    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    answered = [None] * 24

    def start(i):
        answered[i] = svc.client.start_instance({"type": "local"})
    run_in_threads(start, 24)
    took = time.monotonic() - started
    done.set()
    watcher.join()
    agents = svc.client.available_resources()["agents"]
    registered = time.monotonic() - min(a["registered_s"] for a in agents) - started
    nodes = {a["hostname"] for a in agents}
    for inst in answered:
        svc.client.close_instance(inst["instance_id"])
    wait_for(lambda: not mn_jobs([f"--name={svc.job_name}"]) and not svc.client.available_resources()["agents"],
             timeout=60, interval=0.1, what="the pool to empty")
    return {"running": marks.get("running", float("nan")) - started, "registered": registered, "answered": took,
            "nodes": len(nodes)}


def throughput(svc, seconds=5.0, threads=12):
    """`true` commands per second over 6 instances, `threads` clients at once."""
    insts = [svc.client.start_instance({"type": "local"}) for _ in range(6)]
    nodes = sorted({a["hostname"] for a in svc.client.available_resources()["agents"]})
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def run(i):
        client = ZMQClient(svc.zmq, token=svc.token)
        inst = insts[i % len(insts)]["instance_id"]
        while time.monotonic() < deadline:
            client.execute(inst, "true")
            counts[i] += 1
        client.close()
    run_in_threads(run, threads)
    return sum(counts) / seconds, nodes


def multinode(rounds):
    subprocess.run([mn.CLUSTER, "up"], check=True, timeout=60)
    try:
        svc = mn.ClusterService("--max-resources", '{"jobs": 3}', "--slurm-instances", "8", "--slurm-idle-timeout", "0.5",
                                "--log-level", "WARNING")
        raw, service = [], []
        try:
            for _ in range(rounds):
                raw.append(mn_raw_round())
                service.append(mn_service_round(svc))
        finally:
            svc.cleanup()
        rates = {}
        for label, jobs, per_agent in (("3 nodes", 3, 2), ("1 node", 1, 6)):
            svc = mn.ClusterService("--max-resources", json.dumps({"jobs": jobs}), "--slurm-instances", str(per_agent),
                                    "--log-level", "WARNING")
            try:
                rates[label] = throughput(svc)
            finally:
                svc.cleanup()
    finally:
        subprocess.run([mn.CLUSTER, "down"], check=True, timeout=60)
    raw_p50 = statistics.median(raw)
    med = {k: statistics.median(r[k] for r in service) for k in ("running", "registered", "answered")}
    all_answered = " ".join(f"{r['answered']:.2f}" for r in service)
    print(f"\nthree-node cluster, submitting over SSH on the login node, median of {rounds} rounds (s)")
    print(f"{'raw: 3 x sbatch to all RUNNING':44} {raw_p50:7.3f}   (all: {' '.join(f'{t:.2f}' for t in raw)})")
    print(f"{'service: 24 starts to the 3 jobs RUNNING':44} {med['running']:7.3f}")
    print(f"{'service: ... to the 3 agents registered':44} {med['registered']:7.3f}   (agent start: "
          f"{med['registered'] - med['running']:.3f})")
    print(f"{'service: ... to all 24 answered':44} {med['answered']:7.3f}   "
          f"(all: {all_answered}; nodes used: {sorted({r['nodes'] for r in service})})")
    print(f"added by the service: {med['answered'] - raw_p50:.3f} s (target <= 1 s)")
    for label, (rate, nodes) in rates.items():
        print(f"{'throughput of `true`, 6 instances on ' + label:44} {rate:7.0f} commands/s   (agents on {', '.join(nodes)})")
    print(f"ratio 3 nodes / 1 node: {rates['3 nodes'][0] / rates['1 node'][0]:.2f}")


if __name__ == "__main__":
    main()
