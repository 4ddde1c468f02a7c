"""Health, resources and starts while N long commands are in flight over HTTP (issue 12.8).

    python bench/bench_http_load.py [--commands 1000] [--samples 200]

Target: p99 under 100 ms for GET /health, GET /get_available_resources and POST /start_instance
(with its close) while 1,000 commands wait over HTTP, each on its own connection. The baseline,
measured in the same run, is the same requests with nothing in flight; the ratio says what the
load costs.
"""

import argparse
import http.client
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from bench_core import percentile  # noqa: E402
from helpers import Service, live_processes, wait_for  # noqa: E402


def call(conn, method, path, body=None):
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    return answer


def sample(port, samples):
    """Latency series of health, resources and a start (its close untimed), in turn."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    series = {"health": [], "resources": [], "start": []}
    for _ in range(samples):
        for name, method, path, body in [("health", "GET", "/health", None),
                                         ("resources", "GET", "/get_available_resources", None),
                                         ("start", "POST", "/start_instance", {"environment": {"type": "local"}})]:
            started = time.perf_counter()
            answer = call(conn, method, path, body)
            series[name].append(time.perf_counter() - started)
            if name == "start":
                call(conn, "POST", "/close_instance", {"instance_id": answer["instance_id"]})
    conn.close()
    return series


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    marker = f"arservice-bench-load-{os.getpid()}"
    # The commands block reading a FIFO (no CPU while they wait); opening it for writing releases them all.
    release = f"/tmp/arservice-bench-release-{os.getpid()}"  # not the marker: only the commands match it
    os.mkfifo(release)
    svc = Service("--runner", "local", "--max-resources", '{"instances": 4}').wait_ready()
    try:
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        baseline = sample(svc.http_port, args.samples)

        def long_command(_):
            conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=600)
            try:
                return call(conn, "POST", "/execute_command", {
                    "instance_id": inst, "timeout": 600,
                    "command": f"cat {release} >/dev/null; : {marker}"})["returncode"]
            finally:
                conn.close()

        with ThreadPoolExecutor(args.commands) as pool:
            running = [pool.submit(long_command, n) for n in range(args.commands)]
            wait_for(lambda: len(live_processes(marker)) >= args.commands, timeout=300, interval=0.5,
                     what=f"{args.commands} commands in flight")
            loaded = sample(svc.http_port, args.samples)
            in_flight = len(live_processes(marker))
            open(release, "w").close()  # every reader blocked in open() wakes, then reads end of file
            assert [f.result() for f in running] == [0] * args.commands
        print(f"{args.commands} commands in flight over HTTP ({in_flight} still running after sampling), "
              f"{args.samples} samples each; ms")
        print(f"{'request':<10} {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} {'loaded p99':>11} {'p99 ratio':>10}")
        for name in baseline:
            idle50, idle99 = (percentile(baseline[name], q) * 1000 for q in (0.5, 0.99))
            load50, load99 = (percentile(loaded[name], q) * 1000 for q in (0.5, 0.99))
            print(f"{name:<10} {idle50:9.2f} {idle99:9.2f} {load50:11.2f} {load99:11.2f} {load99 / idle99:10.2f}")
        svc.client.close_instance(inst)
    finally:
        if os.path.exists(release):
            os.unlink(release)
        svc.stop()


if __name__ == "__main__":
    main()
