"""What a token costs a ZMQ client (CURVE encryption on the broker's socket), in one run.

    python bench/bench_zmq_auth.py [--n 2000]

Two services side by side, one without a token and one with: ping (a broker round trip), `execute
true` (through an agent) and a 4 MiB write_file (several frames), sampled in turn in a random order.
Target (issue 12): a small command costs at most ~0.05 ms more with a token.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from bench_core import latencies, percentile
from helpers import Service

TOKEN = "bench-token"
BIG = b"x" * (4 << 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="calls per latency series")
    args = parser.parse_args()
    services = {"no token": Service("--runner", "local", "--log-level", "WARNING"),
                "token": Service("--runner", "local", "--log-level", "WARNING", token=TOKEN)}
    try:
        for svc in services.values():
            svc.wait_ready()
        calls = {}
        for label, svc in services.items():
            inst = svc.client.start_instance({"type": "local"})["instance_id"]
            calls[f"ping, {label}"] = svc.client.ping
            calls[f"execute true, {label}"] = lambda svc=svc, inst=inst: svc.client.execute(inst, "true")
            calls[f"write_file 4 MiB, {label}"] = lambda svc=svc, inst=inst: svc.client.write_file(inst, "big", BIG)
        series = latencies(calls, args.n)
        print(f"{'call':32} {'p50 ms':>8} {'p90 ms':>8}")
        for name, values in series.items():
            print(f"{name:32} {statistics.median(values) * 1e3:8.3f} {percentile(values, 0.9) * 1e3:8.3f}")
        for what in ("ping", "execute true", "write_file 4 MiB"):
            extra = statistics.median(series[f"{what}, token"]) - statistics.median(series[f"{what}, no token"])
            print(f"token costs {what}: {extra * 1e3:+.3f} ms at p50")
    finally:
        for svc in services.values():
            svc.stop()


if __name__ == "__main__":
    main()
