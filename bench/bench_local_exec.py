"""Where a `local` command's time goes, against the raw spawn issue 16 measures it by, in one run:

    python bench/bench_local_exec.py [--n 1000]

Every series runs `true` in bash, sampled in turn (bench_core.latencies), p50 and p99 in ms, and
p50 as a ratio of `subprocess.run(["bash", "-c", "true"])` in this process:

    posix_spawn           the same exec with no Python around it: the floor of any exact spawn
    local backend         LocalEnvironment.execute in this process (no service)
    waiting shell         a bash started ahead, waiting on a pipe, that is handed the backend's
                          command file and execs `bash -c true` from it (a new one is started,
                          untimed, after each command): the design of issue 16's part 3, measured
                          before building it into the backend. Its output goes to /dev/null, not
                          to a pipe read as the backend's is: what it saves is at most this
    service ZMQ           execute through a running service (client, broker, agent, back)
    broker round trip     a ZMQ ping: the part of the service's cost that is messaging alone

and, for the series in this process, the CPU a command costs (this process and its children,
the waiting shell's own start included): on a machine whose cores are busy, throughput is CPU.
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
from arservice.environments.base import shell_argv  # noqa: E402
from arservice.environments.helper import script_for  # noqa: E402

from bench_core import latencies, percentile  # noqa: E402
from helpers import Service  # noqa: E402

WAITING_SHELL = 'IFS= read -r f && exec </dev/null && . "$f"'


class WaitingShell:
    """One bash waiting for the path of a command file on its stdin, as a pre-started spare would."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.spare = self._start()

    def _start(self) -> tuple[subprocess.Popen[bytes], int]:
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(["bash", "-c", WAITING_SHELL], stdin=read_end, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
        os.close(read_end)
        return proc, write_end

    def run(self) -> None:
        """Hand the spare its command and wait for it: the timed part."""
        proc, write_end = self.spare
        os.write(write_end, (self.script + "\n").encode())
        os.close(write_end)
        if proc.wait() != 0:
            raise RuntimeError("the waiting shell's command failed")

    def replace(self, _: object) -> None:
        self.spare = self._start()

    def close(self) -> None:
        proc, write_end = self.spare
        os.close(write_end)
        proc.wait()


def posix_spawn() -> None:
    pid = os.posix_spawnp("bash", ["bash", "-c", "true"], os.environ)
    os.waitpid(pid, 0)


def cpu_per_call(start, stop, n: int) -> float:
    """CPU seconds (this process and the children it waited for) per start() + stop()."""
    def used() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    before = used()
    for _ in range(n):
        stop(start())
    return (used() - before) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="commands per series")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="arservice-bench-")
    cls = backend("local")
    env = cls("i-bench0000001", cls.parse_config({"type": "local"}), "bench", root)
    env.start()
    script = os.path.join(root, "command")
    with open(script, "wb") as f:
        f.write(script_for(shell_argv("bash", "true"), env.cwd, {}))
    waiting = WaitingShell(script)
    svc = None
    try:
        svc = Service("--runner", "local", "--log-level", "WARNING").wait_ready()
        instance = svc.client.start_instance({"type": "local"})["instance_id"]
        in_process = {
            "subprocess.run (baseline)": (lambda: subprocess.run(["bash", "-c", "true"], check=True), lambda _: None),
            "posix_spawn": (posix_spawn, lambda _: None),
            "local backend, in process": (lambda: env.execute("true", 10), lambda _: None),
            "waiting shell": (waiting.run, waiting.replace),
        }
        series = latencies({**in_process,
                            "service ZMQ execute": lambda: svc.client.execute(instance, "true"),
                            "broker round trip (ping)": svc.client.ping}, args.n)
        cpu = {name: cpu_per_call(*calls, args.n // 2) for name, calls in in_process.items()}
    finally:
        if svc is not None:
            svc.stop()
        waiting.close()
        env.close()
        shutil.rmtree(root, ignore_errors=True)  # the command file; env.close() removed its own directory
    base = statistics.median(series["subprocess.run (baseline)"])
    print(f"execute `true`, {args.n} each, sampled in turn (ms)")
    print(f"{'':28} {'p50':>7} {'p99':>7} {'p50 / baseline':>15} {'CPU ms':>7}")
    for name, values in series.items():
        p50 = statistics.median(values)
        used = f"{cpu[name] * 1e3:7.3f}" if name in cpu else ""
        print(f"{name:28} {p50 * 1e3:7.3f} {percentile(values, 0.99) * 1e3:7.3f} {p50 / base:15.2f} {used}")
    print(f"target (issue 16): service ZMQ p50 <= 1.0x the baseline: "
          f"{'met' if statistics.median(series['service ZMQ execute']) <= base else 'NOT met'}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1/5/15 min): {load} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
