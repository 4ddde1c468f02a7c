"""Docker and bubblewrap through the service, against the raw tools, in one run.

    python bench/bench_containers.py [--n 200] [--starts 20]

Targets: execute `true` in a docker instance via the service at most 0.1 of the `docker exec`
CLI at p50 (the fast path; issue 11, which made each command an exec of a real `bash -c`);
start_instance at most 1.2 of the SDK's containers.run; for bubblewrap, execute at most 0.2 and
start at most 1.2 of a raw `bwrap` run.
Needs dockerd and the test images: scripts/setup.sh.

The busybox image runs the helper's sh loop, the Debian image its bash loop. For bubblewrap the
run also times the parts a service call is made of (the backend alone in this process, and a
broker round trip), which is where its floor lies.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

import docker

from arservice.environments.extra.bubblewrap import BubblewrapEnvironment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import BOOKWORM, BUSYBOX  # noqa: E402
from bench_core import latencies, percentile  # noqa: E402
from helpers import Service  # noqa: E402

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
    # The owner labels let an agent's reaper remove them should this bench die before it does.
    labels = {"arservice": "1", "arservice.bench": "1", "arservice.host": socket.gethostname(), "arservice.pid": str(os.getpid())}
    scratch = tempfile.mkdtemp(prefix="arservice-bench-")
    os.chmod(scratch, 0o755)  # a root agent's sandbox runs as an unprivileged uid, which must reach it
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
            }, args.n), "docker exec CLI")
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

        def backend_start():
            env = bubblewrap_alone(scratch)
            env.start()
            return env

        # Each start is timed up to the instance running, as start_instance is; its removal is not.
        # The random order matters here too: a sandbox's teardown slows the next set-up.
        series = latencies({
            "SDK containers.run": (lambda: sdk.containers.run(BUSYBOX, ["sleep", "3600"], detach=True, init=True,
                                                              network_mode="none", labels=labels),
                                   lambda container: container.remove(force=True)),
            "service start_instance docker": (lambda: svc.client.start_instance(spec)["instance_id"],
                                              svc.client.close_instance),
            "raw bwrap run": lambda: subprocess.run(RAW_BWRAP, check=True),
            "service start_instance bubblewrap": (lambda: svc.client.start_instance({"type": "bubblewrap"})["instance_id"],
                                                  svc.client.close_instance),
            "part: backend start alone": (backend_start, lambda env: env.close()),
        }, args.starts)
        report("start an instance (docker)", {k: series[k] for k in list(series)[:2]}, "SDK containers.run")
        report("start an instance (bubblewrap)", {k: series[k] for k in list(series)[2:]}, "raw bwrap run")
    finally:
        svc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        for container in sdk.containers.list(all=True, filters={"label": "arservice.bench=1"}):
            container.remove(force=True)


if __name__ == "__main__":
    main()
