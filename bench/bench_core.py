"""Per-command latency and throughput of the service against a raw `bash -c true` spawn, in one run.

    python bench/bench_core.py [--n 2000] [--threads 32]

Targets (issue 2): ZMQ p50 at most 1 ms over the raw spawn, HTTP at most 3 ms;
throughput with 32 concurrent clients at least 0.7 of 32 threads spawning directly.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import Service  # noqa: E402


def latencies(fns, n):
    """Latency series of each fn, sampled in turn, each round in a new random order, so that
    the machine's drift over the run, and the work one call leaves behind (a `docker exec`
    cleaning up), affect every series alike. A fn may be a (start, stop) pair: start is timed,
    then stop(what start returned) cleans up untimed."""
    pairs = {name: fn if isinstance(fn, tuple) else (fn, lambda _: None) for name, fn in fns.items()}
    series = {name: [] for name in fns}
    for start, stop in pairs.values():
        stop(start())  # warm up connections and caches
    order = random.Random(0)
    names = list(fns)
    for _ in range(n):
        order.shuffle(names)
        for name in names:
            start, stop = pairs[name]
            t = time.perf_counter()
            started = start()
            series[name].append(time.perf_counter() - t)
            stop(started)
    return series


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def throughput(fns, n_per_thread):
    """Calls per second with one thread per fn, each calling its fn n_per_thread times."""
    def loop(fn):
        for _ in range(n_per_thread):
            fn()
    with ThreadPoolExecutor(len(fns)) as pool:
        t = time.perf_counter()
        list(pool.map(loop, fns))
        return len(fns) * n_per_thread / (time.perf_counter() - t)


def raw_spawn():
    subprocess.run(["bash", "-c", "true"], check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="commands per latency series")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--per-thread", type=int, default=60)
    args = parser.parse_args()

    svc = Service("--runner", "local", "--max-resources", f'{{"instances": {args.threads}}}', "--log-level", "WARNING").wait_ready()
    try:
        instances = [svc.client.start_instance({"type": "local"})["instance_id"] for _ in range(args.threads)]
        inst = instances[0]
        series = latencies({
            "raw subprocess bash -c true": raw_spawn,
            "ZMQ execute true": lambda: svc.client.execute(inst, "true"),
            "HTTP execute true": lambda: svc.http.execute(inst, "true"),
        }, args.n)
        raw_p50 = statistics.median(series["raw subprocess bash -c true"])
        print(f"latency over {args.n} commands each (ms)")
        print(f"{'':32} {'p50':>8} {'p99':>8} {'p50 overhead':>14}")
        for name, values in series.items():
            p50, p99 = statistics.median(values) * 1e3, percentile(values, 0.99) * 1e3
            print(f"{name:32} {p50:8.3f} {p99:8.3f} {p50 - raw_p50 * 1e3:14.3f}")

        raw_rate = throughput([raw_spawn] * args.threads, args.per_thread)
        zmq_rate = throughput([lambda i=i: svc.client.execute(i, "true") for i in instances], args.per_thread)
        http_rate = throughput([lambda i=i: svc.http.execute(i, "true") for i in instances], args.per_thread)
        print(f"\nthroughput with {args.threads} concurrent clients (commands/s)")
        print(f"{'raw subprocess, 32 threads':32} {raw_rate:8.0f}")
        print(f"{'ZMQ execute':32} {zmq_rate:8.0f}   ratio {zmq_rate / raw_rate:.2f}")
        print(f"{'HTTP execute':32} {http_rate:8.0f}   ratio {http_rate / raw_rate:.2f}")

        zmq_over = (statistics.median(series["ZMQ execute true"]) - raw_p50) * 1e3
        http_over = (statistics.median(series["HTTP execute true"]) - raw_p50) * 1e3
        print("\ntargets")
        print(f"  ZMQ p50 overhead  {zmq_over:6.3f} ms  (target <= 1 ms)   {'met' if zmq_over <= 1 else 'MISSED'}")
        print(f"  HTTP p50 overhead {http_over:6.3f} ms  (target <= 3 ms)   {'met' if http_over <= 3 else 'MISSED'}")
        print(f"  ZMQ throughput    {zmq_rate / raw_rate:6.2f} x raw (target >= 0.7) {'met' if zmq_rate / raw_rate >= 0.7 else 'MISSED'}")
        for instance_id in instances:
            svc.client.close_instance(instance_id)
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
