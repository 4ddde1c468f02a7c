"""What GET /metrics (and the status page's GET /status) cost the broker loop with 1,000 instances.

    python bench/bench_metrics.py [--instances 1000] [--agents 4] [--n 300]

Target (issue 18): under 1 ms of the broker loop per scrape with 1,000 instances.

1. In the loop: a real service with `--instances` real local instances; the broker's answer to
   a METRICS request over ZMQ against its answer to a PING in the same run, sampled in turn. The
   difference is what a scrape adds to a round trip: the loop's snapshot and msgpack encoding,
   plus this client's decoding, so it bounds the loop's share from above.
2. The loop's share alone: a Broker object holding the same number of instances (the broker's
   own state classes, no agents), timing the snapshot plus encoding of its answer, as the loop
   does it, against the encoding of a PING answer.
3. Off the loop, for the record: the HTTP thread's Prometheus rendering of one snapshot.
"""

import argparse
import os
import statistics
import sys
import time

import zmq
from prometheus_client.exposition import generate_latest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from arservice import protocol
from arservice.broker import Broker
from arservice.broker.state import Agent, Instance
from arservice.http.observe import BrokerSnapshot

from bench_core import latencies, percentile
from helpers import Service

TARGET_MS = 1.0


def row(name, values, baseline=None):
    p50, p99 = statistics.median(values) * 1e3, percentile(values, 0.99) * 1e3
    extra = "" if baseline is None else f"{p50 - statistics.median(baseline) * 1e3:14.3f}"
    print(f"{name:40} {p50:8.3f} {p99:8.3f}{extra}")


def timed(fn, n):
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def against_a_real_service(instances, agents, n):
    svc = Service("--runner", "local", "--agents", str(agents), "--max-resources", f'{{"instances": {instances}}}',
                  "--log-level", "WARNING").wait_ready(agents=agents)
    try:
        started = [svc.client.start_instance({"type": "local"})["instance_id"] for _ in range(instances)]
        for instance_id in started[: min(100, instances)]:  # some history for the histograms
            svc.client.execute(instance_id, "true")
        series = latencies({
            "ZMQ ping": lambda: svc.client.ping(),
            "ZMQ metrics": lambda: svc.client.request(protocol.METRICS),
            "ZMQ status": lambda: svc.client.status(),
        }, n)
        print(f"1. real service, {instances} local instances on {agents} agents: round trips over {n} samples (ms)")
        print(f"{'':40} {'p50':>8} {'p99':>8} {'p50 over ping':>14}")
        for name, values in series.items():
            row(name, values, series["ZMQ ping"] if name != "ZMQ ping" else None)
        for instance_id in started:
            svc.client.close_instance(instance_id)
        return statistics.median(series["ZMQ metrics"]) - statistics.median(series["ZMQ ping"])
    finally:
        svc.stop()


def in_the_loop(instances, agents, n):
    context = zmq.Context()
    broker = Broker("tcp://127.0.0.1:0", context=context)
    try:
        now = time.monotonic()
        pool = []
        for a in range(agents):
            agent = Agent(f"agent-{a}".encode(), f"agent-{a}", {"instances": instances, "cpus": None, "memory": None},
                          ["local"], "bench", a, None, now)
            broker.pool.agents[agent.identity] = agent
            pool.append(agent)
        for i in range(instances):
            agent = pool[i % agents]
            inst = Instance(f"i-{i:012x}", agent.agent_id, {"type": "local"}, {"type": "local", "cpus": None, "memory": None})
            inst.state = "running"
            broker.pool.admit(inst, agent)
        for i in range(1000):
            broker.metrics.histograms["arservice_command_duration_seconds"].observe(("local",), i / 1000)
            broker.metrics.error("execute", "not_found", f"no instance 'i-{i}'")
        series = {
            "encode a ping answer": timed(lambda: protocol.encode(protocol.reply(1, {"pong": True, "agents": agents})), n),
            "snapshot + encode for /metrics": timed(
                lambda: protocol.encode(protocol.reply(1, {"families": broker.metrics.families()})), n),
            "snapshot + encode for /status": timed(lambda: protocol.encode(protocol.reply(1, broker.metrics.status())), n),
        }
        print(f"\n2. in the loop: a broker holding {instances} instances on {agents} agents, {n} samples (ms)")
        print(f"{'':40} {'p50':>8} {'p99':>8} {'p50 over ping':>14}")
        for name, values in series.items():
            row(name, values, series["encode a ping answer"] if name != "encode a ping answer" else None)
        families = protocol.decode(protocol.encode(protocol.request("x", 1, families=broker.metrics.families())))["families"]
        render = timed(lambda: generate_latest(BrokerSnapshot(families)), n)
        print("\n3. off the loop: Prometheus text from one snapshot, on the HTTP thread (ms)")
        row("render", render)
        return statistics.median(series["snapshot + encode for /metrics"])
    finally:
        broker.sock.close()
        context.term()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    round_trip = against_a_real_service(args.instances, args.agents, args.n)
    loop = in_the_loop(args.instances, args.agents, args.n)
    print("\ntarget")
    print(f"  broker loop per scrape, {args.instances} instances: {loop * 1e3:.3f} ms in the loop, "
          f"{round_trip * 1e3:.3f} ms added to a round trip (target < {TARGET_MS:g} ms) "
          f"{'met' if max(loop, round_trip) * 1e3 < TARGET_MS else 'MISSED'}")


if __name__ == "__main__":
    main()
