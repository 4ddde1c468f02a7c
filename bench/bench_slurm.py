"""Slurm: from start_instance on an empty pool to the first command's output, in phases,
against a bare `sbatch --wrap` reaching RUNNING, in one run.

    python bench/bench_slurm.py [--rounds 9]

Target (issue 4): the service adds at most 1 s to what Slurm itself takes (sbatch to RUNNING).
Rounds alternate raw and service, so machine drift hits both alike. Needs scripts/slurm-up.sh.
Phases of a service round: submit (start_instance until the job is in squeue), queue (until
RUNNING), agent (until the agent registered), environment (until start_instance returned),
command (until the first output).
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import Service, wait_for  # noqa: E402

POLL_S = 0.02


def squeue(args):
    out = subprocess.run(["squeue", "-h", *args, "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def wait_node_idle():
    """Start every round on an idle node (a job still being torn down delays the next one's launch),
    at a random phase of slurmctld's once-a-second scheduling pass: jobs are allocated on its ticks,
    so rounds that always started at the same phase would measure the phase, not the service."""
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split() == ["idle"],
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
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    svc = Service("--runner", "slurm", "--max-resources", '{"jobs": 1}', "--slurm-idle-timeout", "0.5",
                  "--log-level", "WARNING").wait_ready(agents=0)
    try:
        job_name = svc.client.available_resources()["runner"]["job_name"]
        raw, rounds = [], []
        marker = os.path.join(os.path.expanduser("~"), f".arservice-bench-{os.getpid()}")
        for _ in range(args.rounds):
            raw.append(raw_round(marker))
            rounds.append(service_round(svc, job_name))
    finally:
        svc.stop()
    med = {k: statistics.median(r[k] for r in rounds) for k in ("queued", "running", "registered", "started", "output")}
    raw_p50 = statistics.median(r[0] for r in raw)
    raw_script = statistics.median(r[1] for r in raw)
    print(f"\nempty Slurm pool to first output, median of {args.rounds} rounds (s)")
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


if __name__ == "__main__":
    main()
