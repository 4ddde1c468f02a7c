"""Scale (issue 21): many instances per agent, many clients, the broker's own cost, big payloads.

    python bench/bench_scale.py [--parts throughput,broker,starts,memory] [--seconds 5] [--agents 128]
                                [--counts 100,1000] [--docker 200]

Parts, each with its baseline measured in the same run:
- throughput: commands/s over ZMQ and HTTP (in-process, and --http-workers 2) at 1, 32 and 128
  clients, against 32 threads spawning `bash -c true` directly; per-client counts show starvation
  (a client that finished nothing in the window). Targets: HTTP at 32 clients >= 0.9x ZMQ; no
  starved client at 128.
- broker: CPU seconds the service process (broker loop; no HTTP on this path) spends per routed
  command with --agents N local agents, one instance each, N clients. Target: <= 0.04 ms.
- starts: start N local instances (and --docker N docker ones) on one agent and on four, then one
  command in each, then close them all; wall seconds per phase.
- memory: peak RSS growth (VmHWM after resetting it) of the broker and the agent for one command
  whose output is the payload, and RSS growth left in the broker afterwards. Target: peak <= 2x
  the payload per process, the broker back near idle.
"""

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from arservice.client import HTTPClient

from backends import BUSYBOX
from bench_core import raw_spawn
from helpers import Service

MIB = 1 << 20


def cpu_seconds(pid: int, task: str | None = None) -> float:
    with open(f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zmq_io_cpu_seconds(pid: int) -> float:
    """CPU of the process's libzmq I/O threads (named ZMQbg/...): the sockets' own work, not Python's."""
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as f:
            if f.read().startswith("ZMQbg"):
                total += cpu_seconds(pid, task)
    return total


def memory_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def per_client(fns, seconds: float) -> list[int]:
    """Commands each fn completed in `seconds`, all fns running at once on their own threads."""
    counts = [0] * len(fns)
    start = threading.Barrier(len(fns) + 1)
    stop = threading.Event()

    def loop(index):
        start.wait()
        while not stop.is_set():
            fns[index]()
            counts[index] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(seconds)  # the measuring window itself, not synchronisation
    stop.set()
    for t in threads:
        t.join()
    return counts


def report(name: str, counts: list[int], seconds: float, base: float | None = None) -> float:
    rate = sum(counts) / seconds
    ratio = f"  {rate / base:.2f}x" if base else ""
    print(f"  {name:<34} {rate:8.0f}/s{ratio}  per client min {min(counts)} median {sorted(counts)[len(counts) // 2]}"
          f"  starved {sum(c == 0 for c in counts)}")
    return rate


def commands(client, ids: list[str]) -> list:
    """One `true` command loop per instance (HTTPClient keeps one connection per thread)."""
    return [lambda i=i: client.execute(i, "true") for i in ids]


def part_throughput(args) -> None:
    print(f"throughput ({args.seconds:g} s windows)")
    raw = report("raw bash -c true, 32 threads", per_client([raw_spawn] * 32, args.seconds), args.seconds)
    for workers in ("0", "2"):
        svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 128}',
                      "--http-workers", workers, "--log-level", "WARNING").wait_ready(agents=2)
        try:
            ids = [svc.client.start_instance({"type": "local"})["instance_id"] for _ in range(128)]
            for clients in (1, 32, 128):
                zmq = report(f"ZMQ, {clients} clients", per_client(commands(svc.client, ids[:clients]), args.seconds),
                             args.seconds, raw)
                report(f"HTTP workers={workers}, {clients} clients",
                       per_client(commands(HTTPClient(svc.url), ids[:clients]), args.seconds), args.seconds, zmq)
                print(f"    (HTTP ratio is against ZMQ at {clients} clients; ZMQ's against raw)")
        finally:
            svc.stop()


def part_broker(args) -> None:
    n = args.agents
    print(f"broker CPU per command, {n} local agents, {n} clients")
    svc = Service("--runner", "local", "--agents", str(n), "--max-resources", f'{{"instances": {n}}}',
                  "--log-level", "WARNING").wait_ready(agents=n, timeout=300)
    try:
        with ThreadPoolExecutor(32) as pool:
            ids = list(pool.map(lambda _: svc.client.start_instance({"type": "local"})["instance_id"], range(n)))
        before, io_before = cpu_seconds(svc.proc.pid), zmq_io_cpu_seconds(svc.proc.pid)
        counts = per_client(commands(svc.client, ids), args.seconds)
        used, io = cpu_seconds(svc.proc.pid) - before, zmq_io_cpu_seconds(svc.proc.pid) - io_before
        total = sum(counts)
        # The service process also runs the local runner's watcher (idle) and heartbeats: counted here too.
        print(f"  {total} commands, {total / args.seconds:.0f}/s, broker process CPU {used:.2f}s: "
              f"{used / total * 1000:.3f} ms per command (target 0.04), of which libzmq's I/O thread "
              f"{io / total * 1000:.3f} ms and the Python threads {(used - io) / total * 1000:.3f} ms")
    finally:
        svc.stop(timeout=120)


def part_starts(args) -> None:
    print("starts: start N, one command each, close all (wall seconds)")
    cases = [("local", {"type": "local"}, int(c)) for c in args.counts.split(",")]
    if args.docker:
        cases.append(("docker", {"type": "docker", "image": BUSYBOX, "pull": "never"}, args.docker))
    for agents in (1, 4):
        for name, spec, count in cases:
            started, driven, closed = start_drive_close(agents, spec, count)
            print(f"  {count:5d} {name:<7} on {agents} agent(s): start {started:6.1f}  command {driven:5.1f}  "
                  f"close {closed:5.1f}")


def start_drive_close(agents: int, spec: dict, count: int) -> tuple[float, float, float]:
    svc = Service("--runner", "local", "--agents", str(agents), "--max-resources", f'{{"instances": {count}}}',
                  "--log-level", "WARNING").wait_ready(agents=agents)
    client = svc.client
    try:
        with ThreadPoolExecutor(32) as pool:
            t0 = time.perf_counter()
            ids = [i["instance_id"] for i in pool.map(lambda _: client.start_instance(spec), range(count))]
            t1 = time.perf_counter()
            assert all(r["output"] == "x\n" for r in pool.map(lambda i: client.execute(i, "echo x"), ids))
            t2 = time.perf_counter()
            list(pool.map(client.close_instance, ids))
            return t1 - t0, t2 - t1, time.perf_counter() - t2
    finally:
        svc.stop(timeout=120)


def http_worker_pids(service_pid: int) -> list[int]:
    """The HTTP worker processes (--http-workers) a service started."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == service_pid and b"arservice.http.workers" in argv:
            pids.append(int(entry))
    return pids


# One payload of `size` bytes through the service, each way it can go.
PAYLOAD_REQUESTS = {
    "ZMQ execute": lambda svc, inst, size: svc.client.execute(inst, f"head -c {size} /dev/zero", output_limit=size,
                                                              raw=True),
    "HTTP execute": lambda svc, inst, size: svc.http.execute(inst, f"head -c {size} /dev/zero | tr '\\0' x",
                                                             output_limit=size),
    "HTTP write_file": lambda svc, inst, size: svc.http.write_file(inst, "payload", "x" * size),
}


def part_memory(args) -> None:
    print("memory: peak RSS growth per process for one payload (MiB, and x the payload); the service process\n"
          "(broker, and HTTP unless --http-workers) grows by what is left after")
    for workers in ("0", "1"):
        svc = Service("--runner", "local", "--http-workers", workers, "--log-level", "WARNING").wait_ready()
        try:
            processes = {"service": svc.proc.pid, "agent": svc.agent_pids()[0]}
            processes.update(("HTTP worker", pid) for pid in http_worker_pids(svc.proc.pid))
            inst = svc.client.start_instance({"type": "local"})["instance_id"]
            svc.client.execute(inst, "true")
            idle = memory_kib(svc.proc.pid, "VmRSS")
            print(f"  --http-workers {workers}")
            for size in (1 * MIB, 10 * MIB, 32 * MIB, 64 * MIB):  # 64 MiB: the largest output_limit
                for what, request in PAYLOAD_REQUESTS.items():
                    if what.startswith("ZMQ") and workers != "0":  # the same path as without workers
                        continue
                    for pid in processes.values():
                        reset_peak(pid)
                    base = {pid: memory_kib(pid, "VmRSS") for pid in processes.values()}
                    request(svc, inst, size)
                    peaks = "  ".join(f"{name} +{(memory_kib(pid, 'VmHWM') - base[pid]) / 1024:4.0f} "
                                      f"({(memory_kib(pid, 'VmHWM') - base[pid]) / 1024 / (size / MIB):.1f}x)"
                                      for name, pid in processes.items())
                    after = (memory_kib(svc.proc.pid, "VmRSS") - idle) / 1024
                    print(f"    {size // MIB:3d} MiB {what:<15}: {peaks}  service after +{after:.0f}")
        finally:
            svc.stop()


PARTS = {"throughput": part_throughput, "broker": part_broker, "starts": part_starts, "memory": part_memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--agents", type=int, default=128, help="local agents for the broker part")
    parser.add_argument("--counts", default="100,1000", help="local instance counts for the starts part")
    parser.add_argument("--docker", type=int, default=200, help="docker instances for the starts part (0: none)")
    args = parser.parse_args()
    print(f"bench_scale on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (the machine may be shared)")
    for name in args.parts.split(","):
        PARTS[name](args)


if __name__ == "__main__":
    main()
