"""Docker and bubblewrap through the service, against the raw tools, in one run.

    python bench/bench_containers.py [--n 200] [--starts 20]

Targets (issue 3): execute `true` in a docker instance via the service at most 0.2 of the
docker SDK's exec_run at p50 (the fast path); start_instance at most 1.2 of the SDK's
containers.run; the same two ratios for bubblewrap against a raw `bwrap` run.
Needs dockerd and the test images: scripts/setup.sh.

The busybox image runs the helper's sh loop, the Debian image its bash loop. For bubblewrap the
run also times the parts a service call is made of (the backend alone in this process, and a
broker round trip), which is where its floor lies.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import docker

from arservice.environments.extra.bubblewrap import BubblewrapEnvironment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import BOOKWORM, BUSYBOX  # noqa: E402
from helpers import Service  # noqa: E402
from bench_core import latencies, percentile  # noqa: E402

RAW_BWRAP = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
             "--new-session", "/bin/sh", "-c", "true"]


def report(title, series, baseline):
    base = statistics.median(series[baseline])
    print(f"\n{title} (ms)")
    print(f"{'':40} {'p50':>9} {'p99':>9} {'p50 / ' + baseline.split()[0]:>16}")
    for name, values in series.items():
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        print(f"{name:40} {p50 * 1e3:9.2f} {p99 * 1e3:9.2f} {p50 / base:16.3f}")


def bubblewrap_alone(workdir_root):
    """A bubblewrap environment driven in this process: the backend's own cost, no service."""
    return BubblewrapEnvironment("bench", BubblewrapEnvironment.parse_config({"type": "bubblewrap"}), "bench",
                                 workdir_root)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="commands per latency series")
    parser.add_argument("--starts", type=int, default=20, help="instance starts per series")
    args = parser.parse_args()

    sdk = docker.from_env()
    spec = {"type": "docker", "image": BUSYBOX, "pull": "never"}
    labels = {"arservice": "1", "arservice.bench": "1"}
    scratch = tempfile.mkdtemp(prefix="arservice-bench-")
    svc = Service("--runner", "local", "--max-resources", '{"instances": 8}', "--log-level", "WARNING").wait_ready()
    try:
        inst = svc.client.start_instance(spec)["instance_id"]
        inst_bash = svc.client.start_instance({**spec, "image": BOOKWORM})["instance_id"]
        raw = sdk.containers.run(BUSYBOX, ["sleep", "3600"], detach=True, init=True, network_mode="none", labels=labels)
        bw = svc.client.start_instance({"type": "bubblewrap"})["instance_id"]
        in_process = bubblewrap_alone(scratch)
        in_process.start()
        try:
            report("execute `true` in docker", latencies({
                "SDK exec_run": lambda: raw.exec_run(["sh", "-c", "true"]),
                "docker exec CLI": lambda: subprocess.run(["docker", "exec", raw.id, "sh", "-c", "true"], check=True),
                "service (ZMQ client)": lambda: svc.client.execute(inst, "true"),
                "service (HTTP client)": lambda: svc.http.execute(inst, "true"),
                "service (ZMQ), Debian image": lambda: svc.client.execute(inst_bash, "true"),
            }, args.n), "SDK exec_run")
            report("execute `true` in bubblewrap", latencies({
                "raw bwrap sh -c true": lambda: subprocess.run(RAW_BWRAP, check=True),
                "service (ZMQ client)": lambda: svc.client.execute(bw, "true"),
                "part: backend alone, in process": lambda: in_process.execute("true", 10),
                "part: broker round trip (ping)": svc.client.ping,
            }, args.n), "raw bwrap sh -c true")
        finally:
            raw.remove(force=True)
            in_process.close()
            svc.client.close_instance(inst)
            svc.client.close_instance(inst_bash)
            svc.client.close_instance(bw)

        def service_start(kind_spec):
            def start():
                svc.client.close_instance(svc.client.start_instance(kind_spec)["instance_id"])
            return start

        def timed_run():
            # Timed up to the container running, as start_instance is; the removal is not counted.
            t = time.perf_counter()
            container = sdk.containers.run(BUSYBOX, ["sleep", "3600"], detach=True, init=True, network_mode="none", labels=labels)
            elapsed = time.perf_counter() - t
            container.remove(force=True)
            return elapsed

        def timed_backend_start():
            env = bubblewrap_alone(scratch)
            t = time.perf_counter()
            env.start()
            elapsed = time.perf_counter() - t
            env.close()
            return elapsed

        def timed_service(kind_spec):
            t = time.perf_counter()
            instance_id = svc.client.start_instance(kind_spec)["instance_id"]
            elapsed = time.perf_counter() - t
            svc.client.close_instance(instance_id)
            return elapsed

        series = {"SDK containers.run": [], "service start_instance docker": [],
                  "raw bwrap run": [], "service start_instance bubblewrap": [], "part: backend start alone": []}
        timed_run(), timed_service(spec)  # warm up
        for _ in range(args.starts):
            series["SDK containers.run"].append(timed_run())
            series["service start_instance docker"].append(timed_service(spec))
            t = time.perf_counter()
            subprocess.run(RAW_BWRAP, check=True)
            series["raw bwrap run"].append(time.perf_counter() - t)
            series["service start_instance bubblewrap"].append(timed_service({"type": "bubblewrap"}))
            series["part: backend start alone"].append(timed_backend_start())
        report("start an instance (docker)", {k: series[k] for k in list(series)[:2]}, "SDK containers.run")
        report("start an instance (bubblewrap)", {k: series[k] for k in list(series)[2:]}, "raw bwrap run")
    finally:
        svc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        for container in sdk.containers.list(all=True, filters={"label": "arservice.bench=1"}):
            container.remove(force=True)


if __name__ == "__main__":
    main()
