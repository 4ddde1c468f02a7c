"""Sessions and streaming through a real service over ZMQ:

1. run_in_session of `true`, p50 and p99 in ms, against execute_command of `true` in the same run
   (interleaved, so the machine's load weighs on both alike), and their ratio;
2. how long after a line is written its streamed chunk reaches the client, for
   `for i in 1..5; do echo <now>; sleep 0.2; done` (each line carries the time it was written,
   read from the same clock the client reads).

    PYTHONPATH=$PWD python bench/bench_sessions.py [--n 300] [--runs 10]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import SPECS, missing
from helpers import Service

NAMES = ("local", "docker-bookworm", "bubblewrap")
STREAMED = "for i in 1 2 3 4 5; do echo $(date +%s%N); sleep 0.2; done"


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    svc = Service("--runner", "local", "--agents", "1").wait_ready(agents=1)
    try:
        client = svc.client
        for name in NAMES:
            if missing(name):
                print(f"{name:16} skipped: {missing(name)}")
                continue
            inst = client.start_instance(SPECS[name])["instance_id"]
            try:
                client.create_session(inst)
                execute, session = [], []
                calls = ((execute, client.execute, (inst, "true")), (session, client.run_in_session, (inst, "default", "true")))
                for i in range(args.n + 20):
                    for times, call, call_args in calls:
                        started = time.perf_counter()
                        call(*call_args)
                        if i >= 20:  # warm-up
                            times.append(time.perf_counter() - started)
                p50_e, p50_s = statistics.median(execute), statistics.median(session)
                print(f"{name:16} execute p50 {p50_e * 1e3:6.2f} p99 {percentile(execute, 0.99) * 1e3:6.2f}   "
                      f"run_in_session p50 {p50_s * 1e3:6.2f} p99 {percentile(session, 0.99) * 1e3:6.2f}   "
                      f"session/execute {p50_s / p50_e:.2f}")
                first, every = [], []
                for _ in range(args.runs):
                    lines = []
                    for event in client.execute_stream(inst, STREAMED, raw=True):
                        if isinstance(event, bytes):
                            now = time.time_ns()
                            lines += [(now - int(line)) / 1e6 for line in event.split()]
                    first.append(lines[0])
                    every += lines
                print(f"{name:16} streamed line reaches the client after (ms): first p50 {statistics.median(first):5.2f} "
                      f"max {max(first):5.2f}; every line p50 {statistics.median(every):5.2f} p99 {percentile(every, 0.99):5.2f}")
            finally:
                client.close_instance(inst)
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
