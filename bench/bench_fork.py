"""fork_instance of an instance with 100 MB of changed files into 4 copies, per backend, in one run.

    python bench/bench_fork.py [--mb 100] [--count 4] [--rounds 3]

Baseline in the same run: starting `count` fresh instances of the same spec (what a fork saves
you from, before you even redo the work that made the files). Targets (issue 16): docker at most
2 s, local and bubblewrap at most 0.5 s. Needs dockerd and the test images (scripts/setup.sh).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import SPECS, missing  # noqa: E402
from helpers import Service  # noqa: E402

NAMES = {"docker-bookworm": 2.0, "local": 0.5, "bubblewrap": 0.5}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    svc = Service("--runner", "local", "--max-resources", f'{{"instances": {2 * args.count + 2}}}',
                  "--log-level", "WARNING").wait_ready()
    client = svc.client
    # 100 files of 1 MB, as a checkout and a build would leave them (not one file a filesystem may share).
    make = f"mkdir -p data && for i in $(seq {args.mb}); do head -c 1048576 /dev/urandom > data/f$i; done"
    rows = []
    try:
        for name, target in NAMES.items():
            if missing(name):
                print(f"{name:16} skipped: {missing(name)}")
                continue
            forks, fresh = [], []
            for _ in range(args.rounds):
                source = client.start_instance(SPECS[name])["instance_id"]
                assert client.execute(source, make, timeout=300)["returncode"] == 0
                started = time.perf_counter()
                made = client.fork_instance(source, args.count)["instances"]
                forks.append(time.perf_counter() - started)
                check = client.execute(made[-1]["instance_id"], "du -sm data | cut -f1")["output"].strip()
                assert int(check) >= args.mb, check
                started = time.perf_counter()
                new = [client.start_instance(SPECS[name]) for _ in range(args.count)]
                fresh.append(time.perf_counter() - started)
                for inst in [*made, *new, {"instance_id": source}]:
                    client.close_instance(inst["instance_id"])
            rows.append((name, statistics.median(forks), statistics.median(fresh), target))
    finally:
        svc.stop()
    print(f"\nfork of an instance with {args.mb} MB in {args.mb} files into {args.count}, median of {args.rounds}")
    print(f"{'':16} {'fork s':>8} {f'{args.count} fresh starts s':>20} {'target s':>9}")
    for name, fork, fresh, target in rows:
        print(f"{name:16} {fork:8.2f} {fresh:20.2f} {target:9.1f}  {'met' if fork <= target else 'NOT met'}")
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
