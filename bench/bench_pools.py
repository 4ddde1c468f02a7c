"""Warm docker starts from a pool against cold starts and mini-swe-agent's DockerEnvironment, in one run.

    python bench/bench_pools.py [--rounds 3] [--size 16]

Each round: the pool (--pool debian=SIZE) fills; SIZE starts take its instances one after the
other (warm, sequential); it fills again; SIZE starts take them all at once from SIZE threads
(warm, parallel); then, untimed apart from themselves, a cold start through the service (an inline
spec, never pooled) and a mini-swe-agent DockerEnvironment start on the same image. Targets
(issue 16): warm p50 at most 10 ms and at most 0.1 of mini-swe-agent's start; 16 parallel warm
starts p99 at most 50 ms. Needs dockerd, the test image and mini-swe-agent (the bench extra).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.environments.docker import DockerEnvironment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import BOOKWORM  # noqa: E402
from bench_core import percentile  # noqa: E402
from helpers import Service, wait_for  # noqa: E402

SPEC = {"type": "docker", "image": BOOKWORM, "pull": "never"}


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    presets = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"debian": SPEC, "pools": {"debian": args.size}}, presets)
    presets.close()
    svc = Service("--runner", "local", "--max-resources", json.dumps({"instances": 2 * args.size + 1}),
                  "--environments", presets.name, "--log-level", "WARNING").wait_ready()
    client = svc.client
    series = {"warm start, one at a time": [], f"warm start, {args.size} at once": [],
              "cold start through the service": [], "mini-swe-agent DockerEnvironment start": []}

    def full():
        wait_for(lambda: client.available_resources()["pools"]["debian"]["ready"] == args.size, timeout=300,
                 interval=0.1, what="the pool to fill")

    try:
        for round_ in range(args.rounds):
            taken = []
            full()
            for _ in range(args.size):
                took, inst = timed(lambda: client.start_instance("debian"))
                series["warm start, one at a time"].append(took)
                taken.append(inst["instance_id"])
            full()
            with ThreadPoolExecutor(args.size) as threads:
                for took, inst in threads.map(lambda _: timed(lambda: client.start_instance("debian")), range(args.size)):
                    series[f"warm start, {args.size} at once"].append(took)
                    taken.append(inst["instance_id"])
            for instance_id in taken:
                client.close_instance(instance_id)
            full()  # so that refills do not run beside the cold starts
            took, inst = timed(lambda: client.start_instance(SPEC))
            series["cold start through the service"].append(took)
            client.close_instance(inst["instance_id"])
            took, env = timed(lambda: DockerEnvironment(image=BOOKWORM))
            series["mini-swe-agent DockerEnvironment start"].append(took)
            env.cleanup()
            print(f"round {round_ + 1} done", flush=True)
    finally:
        svc.stop()
        os.unlink(presets.name)

    print(f"\ndocker starts of {BOOKWORM}, pool of {args.size}, {args.rounds} round(s)")
    print(f"{'':40} {'p50 ms':>9} {'p99 ms':>9} {'n':>5}")
    for name, times in series.items():
        print(f"{name:40} {statistics.median(times) * 1e3:9.2f} {percentile(times, 0.99) * 1e3:9.2f} {len(times):5}")
    warm = statistics.median(series["warm start, one at a time"])
    mini = statistics.median(series["mini-swe-agent DockerEnvironment start"])
    parallel_p99 = percentile(series[f"warm start, {args.size} at once"], 0.99)
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"\nwarm start p50         {warm * 1e3:7.2f} ms  (target <= 10 ms)")
    print(f"warm / mini-swe-agent  {warm / mini:7.3f}     (target <= 0.1)")
    print(f"{args.size} at once p99       {parallel_p99 * 1e3:7.2f} ms  (target <= 50 ms)")


if __name__ == "__main__":
    main()
