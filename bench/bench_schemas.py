"""What validating a message with its typed schema costs, against the ZMQ round trip it is part of.

    python bench/bench_schemas.py [--n 20000]

Target (issue 13): the schemas add at most 0.05 ms to a message. Measured in one run: each
request's validation alone (schemas.request_of, and a spec's parse_config), and a `ping` and an
`execute` of `true` over ZMQ through a real service, whose broker validates each request once.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from arservice import environments, protocol, schemas

from helpers import Service

BUDGET_MS = 0.05
MESSAGES = {
    "execute": protocol.request(protocol.EXECUTE, 1, instance_id="i-0123456789ab", command="echo hi", timeout=30,
                                env={"A": "1"}),
    "start_instance (preset)": protocol.request(protocol.START_INSTANCE, 2, environment="task"),
    "write_file": protocol.request(protocol.WRITE_FILE, 3, instance_id="i-0123456789ab", path="a.txt", content=b"x" * 100),
    "instances": protocol.request(protocol.INSTANCES, 4, state="running", limit=100),
}
SPEC = {"type": "docker", "image": "python:3.12", "memory": "2g", "cpus": 2, "env": {"PIP_NO_INPUT": "1"},
        "timeout": 120}


def per_call_ms(fn, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    print(f"bench_schemas on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for name, msg in MESSAGES.items():
        cost = per_call_ms(lambda msg=msg: schemas.request_of(msg), args.n)
        print(f"  validate {name:<24} {cost * 1000:6.1f} us  ({cost / BUDGET_MS:.2f} of the 0.05 ms budget)")
    docker = environments.backend("docker")
    cost = per_call_ms(lambda: docker.parse_config(SPEC), args.n)
    print(f"  validate {'a docker spec':<24} {cost * 1000:6.1f} us  ({cost / BUDGET_MS:.2f} of the budget; once per start)")
    svc = Service("--runner", "local", "--log-level", "WARNING").wait_ready()
    try:
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        validate_execute = per_call_ms(lambda: schemas.request_of(MESSAGES["execute"]), 2000)
        for name, call in (("ping", svc.client.ping), ("execute true", lambda: svc.client.execute(inst, "true"))):
            call()
            samples = []
            for _ in range(min(args.n // 10, 2000)):
                started = time.perf_counter()
                call()
                samples.append((time.perf_counter() - started) * 1000)
            p50 = statistics.median(samples)
            print(f"  ZMQ {name:<14} p50 {p50:.3f} ms (an execute's validation would be {validate_execute / p50:.1%} of it)")
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
