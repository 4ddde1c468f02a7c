"""The fast exec path's own cost: execute `true` through a backend driven in this process (no
service, no broker), p50 and p99 in ms. Run it against two trees to see what a change costs:

    PYTHONPATH=/path/to/old python bench/bench_exec_path.py
    PYTHONPATH=$PWD python bench/bench_exec_path.py

Interleave the runs on a shared machine: its load moves these figures more than most changes.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from arservice.environments import backend  # noqa: E402

from backends import SPECS, missing  # noqa: E402

NAMES = ("docker-bookworm", "docker-busybox", "bubblewrap")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="arservice-bench-")
    for name in NAMES:
        if missing(name):
            print(f"{name:18} skipped: {missing(name)}")
            continue
        cls = backend(SPECS[name]["type"])
        env = cls("i-bench0000001", cls.parse_config(SPECS[name]), "bench", root)
        env.start()
        try:
            for _ in range(20):
                env.execute("true", 10)
            times = []
            for _ in range(args.n):
                started = time.perf_counter()
                env.execute("true", 10)
                times.append(time.perf_counter() - started)
        finally:
            env.close()
        times.sort()
        print(f"{name:18} p50 {statistics.median(times) * 1e3:6.2f}  p99 {times[int(len(times) * 0.99)] * 1e3:6.2f}")


if __name__ == "__main__":
    main()
