"""Where a `local` command's time goes, against the raw spawn issue 16 measures it by, in one run:

    python bench/bench_local_exec.py [--n 1000]

Every series runs `true` in bash, sampled in turn (bench_core.latencies), p50 and p99 in ms, and
p50 as a ratio of `subprocess.run(["bash", "-c", "true"])` in this process:

    posix_spawn           the same exec with no Python around it: the floor of any exact spawn
    local backend         LocalEnvironment.execute in this process (no service)
    local ..., fast_exec  the same with `fast_exec` (issue 16's part 3): the command's process is a
                          shell started ahead, which execs `bash -c true` when handed it; the next
                          one is started while the command runs (so timed, as in the agent)
    service ZMQ           execute through a running service (client, broker, agent, back)
    service ..., fast_exec  the same on a fast_exec instance
    broker round trip     a ZMQ ping: the part of the service's cost that is messaging alone

and, for the series in this process, the CPU a command costs (this process and its children,
the spare shell's start included): on a machine whose cores are busy, throughput is CPU.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from arservice.environments import backend  # noqa: E402

from bench_core import latencies, percentile  # noqa: E402
from helpers import Service  # noqa: E402


def posix_spawn() -> None:
    pid = os.posix_spawnp("bash", ["bash", "-c", "true"], os.environ)
    os.waitpid(pid, 0)


def cpu_per_call(call, n: int) -> float:
    """CPU seconds (this process and the children it waited for) per call()."""
    def used() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    before = used()
    for _ in range(n):
        call()
    return (used() - before) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="commands per series")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="arservice-bench-")
    cls = backend("local")
    envs = [cls(f"i-bench{fast:07d}", cls.parse_config({"type": "local", "fast_exec": bool(fast)}), "bench", root)
            for fast in (0, 1)]
    svc = None
    try:
        for env in envs:
            env.start()
        svc = Service("--runner", "local", "--log-level", "WARNING").wait_ready()
        instances = [svc.client.start_instance({"type": "local", "fast_exec": fast})["instance_id"]
                     for fast in (False, True)]
        in_process = {
            "subprocess.run (baseline)": lambda: subprocess.run(["bash", "-c", "true"], check=True),
            "posix_spawn": posix_spawn,
            "local backend, in process": lambda: envs[0].execute("true", 10),
            "local backend, fast_exec": lambda: envs[1].execute("true", 10),
        }
        series = latencies({**in_process,
                            "service ZMQ execute": lambda: svc.client.execute(instances[0], "true"),
                            "service ZMQ, fast_exec": lambda: svc.client.execute(instances[1], "true"),
                            "broker round trip (ping)": svc.client.ping}, args.n)
        cpu = {name: cpu_per_call(call, args.n // 2) for name, call in in_process.items()}
    finally:
        if svc is not None:
            svc.stop()
        for env in envs:
            env.close()
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(series["subprocess.run (baseline)"])
    print(f"execute `true`, {args.n} each, sampled in turn (ms)")
    print(f"{'':28} {'p50':>7} {'p99':>7} {'p50 / baseline':>15} {'CPU ms':>7}")
    for name, values in series.items():
        p50 = statistics.median(values)
        used = f"{cpu[name] * 1e3:7.3f}" if name in cpu else ""
        print(f"{name:28} {p50 * 1e3:7.3f} {percentile(values, 0.99) * 1e3:7.3f} {p50 / base:15.2f} {used}")
    for name in ("service ZMQ execute", "service ZMQ, fast_exec"):
        p50 = statistics.median(series[name])
        print(f"target (issue 16), {name} p50 <= 1.0x the baseline: {'met' if p50 <= base else 'NOT met'}; "
              f"<= the baseline + 1 ms (proposed): {'met' if p50 <= base + 1e-3 else 'NOT met'}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1/5/15 min): {load} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
