"""Scale: listing many instances in pages, hundreds of instances on one agent, log levels reaching agents."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.client import HTTPClient, HTTPRequest, ServiceError

from backends import SPECS, params
from helpers import Service, live_processes, parent, proc_status

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def many():
    """A service with two agents and room for many local instances; each test closes what it starts."""
    svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 1200}',
                  "--log-level", "DEBUG").wait_ready(agents=2)
    yield svc
    assert svc.stop() == 0


def _start(client, spec, count):
    with ThreadPoolExecutor(32) as pool:
        return [i["instance_id"] for i in pool.map(lambda _: client.start_instance(spec), range(count))]


def _close(client, ids, workers=32):
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(client.close_instance, ids))


@pytest.mark.parametrize("transport", ["zmq", "http"])
def test_instances_pages_and_filters(many, transport):
    client = many.client if transport == "zmq" else many.http
    ids = _start(client, {"type": "local"}, 30)
    try:
        mine = set(ids)
        # Every page in instance id order; the last id of a page is the cursor for the next one.
        seen, after = [], None
        while True:
            page = client.instances(limit=7, after=after)
            assert len(page) <= 7
            seen += [i["instance_id"] for i in page]
            if len(page) < 7:
                break
            after = page[-1]["instance_id"]
        assert seen == sorted(seen) and len(seen) == len(set(seen))
        assert mine <= set(seen)
        agents = {a["agent_id"] for a in client.available_resources()["agents"]}
        by_agent = {agent: {i["instance_id"] for i in client.instances(agent_id=agent)} for agent in agents}
        assert all(all(i["agent_id"] == agent for i in client.instances(agent_id=agent)) for agent in agents)
        assert mine <= set().union(*by_agent.values()) and all(mine & listed for listed in by_agent.values())
        assert mine <= {i["instance_id"] for i in client.instances(state="running", env_type="local")}
        assert not mine & {i["instance_id"] for i in client.instances(state="closing")}
        assert client.instances(env_type="local", agent_id="no-such-agent") == []
    finally:
        _close(client, ids)
    assert not mine & {i["instance_id"] for i in client.instances()}


def test_instances_paging_over_http_gives_the_cursor(many):
    ids = _start(many.client, {"type": "local"}, 3)
    try:
        status, body = many.http._send(HTTPRequest("GET", "/instances?limit=1", None), 10)
        assert status == 200
        answer = json.loads(body)
        assert len(answer["instances"]) == 1 and answer["next"] == answer["instances"][0]["instance_id"]
        status, body = many.http._send(HTTPRequest("GET", "/instances?limit=ten", None), 10)
        assert status == 400 and b"limit" in body
    finally:
        _close(many.client, ids)


@pytest.mark.parametrize("bad, code", [({"limit": 0}, "invalid_request"), ({"limit": "5"}, "invalid_request"),
                                       ({"state": 3}, "invalid_request"), ({"after": ["x"]}, "invalid_request")])
def test_instances_refuses_bad_filters(many, bad, code):
    with pytest.raises(ServiceError) as err:
        many.client.request("instances", 10, **bad)
    assert err.value.code == code and next(iter(bad)) in err.value.message


def test_log_level_reaches_the_local_agents(many):
    for pid in many.agent_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[argv.index(b"--log-level") + 1] == b"DEBUG"


# How many instances one agent holds in the scale test. 1,000 bubblewrap sandboxes take the agent past
# 1,023 descriptors in 35 s; 300 docker containers took 176 s on this shared 2-core machine, too long for
# CI, so the test runs 100 (ARSERVICE_SCALE_DOCKER=300 for the count; bench/bench_scale.py runs 200).
HUNDREDS = {"bubblewrap": int(os.environ.get("ARSERVICE_SCALE_BWRAP", "1000")),
            "docker-busybox": int(os.environ.get("ARSERVICE_SCALE_DOCKER", "100"))}
# Closes at once: dockerd removes containers one by one, and a close queued behind too many others
# passes the broker's 60 s close timeout on a loaded machine.
CLOSING = {"bubblewrap": 32, "docker-busybox": 8}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("spec", params(*HUNDREDS))
def test_hundreds_of_instances_on_one_agent(spec):
    """Past 1,023 descriptors an agent must still start and drive sandboxes (select() could not)."""
    count = HUNDREDS[spec]
    svc = Service("--runner", "local", "--agents", "1", "--max-resources", f'{{"instances": {count}}}').wait_ready()
    ids = []
    try:
        with ThreadPoolExecutor(32) as pool:
            starts = list(pool.map(lambda _: _try(svc.client.start_instance, SPECS[spec]), range(count)))
        ids = [s["instance_id"] for s in starts if isinstance(s, dict)]
        failures = [s for s in starts if not isinstance(s, dict)]
        assert not failures, f"{len(failures)} of {count} starts failed, first: {failures[0]}"
        with ThreadPoolExecutor(32) as pool:
            outputs = list(pool.map(lambda i: svc.client.execute(i, "echo $((6*7))")["output"], ids))
        assert outputs == ["42\n"] * count
    finally:
        _close(svc.client, ids, CLOSING[spec])
        assert svc.stop() == 0


def _try(call, *args):
    try:
        return call(*args)
    except ServiceError as exc:
        return exc


def _sockets_on(pid: int, port: int, state: str) -> int:
    """TCP sockets on local `port` in `state` ("01" established, "0A" listening) that process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state and cols[9] in inodes:
                    count += 1
    return count


def test_http_workers_serve_the_port_with_the_same_app():
    """--http-workers: worker processes share the HTTP port, as clients of the broker, with the token off argv."""
    token = "scale-worker-token"
    svc = Service("--runner", "local", "--http-workers", "2", "--max-request-bytes", "2048", token=token).wait_ready()
    try:
        workers = live_processes("arservice.http.workers")
        workers = [pid for pid in workers if parent(pid) == svc.proc.pid]
        assert len(workers) == 2
        for pid in workers:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert token.encode() not in f.read()
        # The app is the one in-process HTTP runs: the token checked, the body limit, every route.
        with pytest.raises(ServiceError) as err:
            HTTPClient(svc.url, token="wrong").instances()
        assert err.value.code == "unauthorized"
        with pytest.raises(ServiceError) as err:
            svc.http.write_file("i-none", "f", b"x" * 2100)  # base64: past 2048, within waitress's 2x backstop
        assert err.value.code == "payload_too_large"
        inst = svc.http.start_instance({"type": "local"})["instance_id"]
        assert svc.http.execute(inst, "echo $((6*7))")["output"] == "42\n"
        svc.http.close_instance(inst)
        # Every worker accepts on the one port; which one the kernel hands a connection to is its
        # choice (a busy machine may give all to one), so the 32 clients' connections are counted
        # over the workers together: each client keeps its own.
        assert all(_sockets_on(pid, svc.http_port, "0A") == 1 for pid in workers)
        barrier = threading.Barrier(32)

        def client(_):
            http = HTTPClient(svc.url, token=token)
            http.ping()
            barrier.wait(timeout=30)
            held = sum(_sockets_on(pid, svc.http_port, "01") for pid in workers)
            barrier.wait(timeout=30)
            return held
        with ThreadPoolExecutor(32) as pool:
            held = list(pool.map(client, range(32)))
        assert min(held) >= 32, held
    finally:
        assert svc.stop() == 0
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def _rss_mib(pid):
    return int(proc_status(pid, "VmRSS").split()[0]) / 1024


def test_large_payloads_leave_the_service_process_near_idle():
    """glibc raises its mmap threshold each time it frees a large block (up to 32 MiB), so later
    payloads of a few MiB come from the heap arenas, which keep them. Without the fixed threshold
    (arservice/allocator.py) the service grew 35, 61, 110, 159 MiB over these four rounds of 8 MiB
    (452 MiB after 40); with it, 1 to 3 (10 MiB after 60). 64 MiB payloads, past glibc's ceiling,
    show it only after ten rounds or so."""
    svc = Service("--runner", "local", "--log-level", "WARNING").wait_ready()
    try:
        inst = svc.client.start_instance({"type": "local"})["instance_id"]
        size = 8 << 20
        idle = _rss_mib(svc.proc.pid)
        grown = []
        for _ in range(4):
            svc.http.execute(inst, f"head -c {size} /dev/zero | tr '\\0' x", output_limit=size)
            svc.http.write_file(inst, "payload", "x" * size)
            grown.append(round(_rss_mib(svc.proc.pid) - idle))
        assert max(grown) < 32, f"MiB over idle after each round: {grown}"
    finally:
        assert svc.stop() == 0


@pytest.mark.timeout(300)
def test_an_http_worker_serves_from_hundreds_of_threads_at_once():
    """Before, a worker's ZMQ context counted one socket per waitress thread, while each thread's
    link to the broker holds three (a DEALER and its monitor's two): once more than 512 threads had
    served a request, every request a new thread took was a 500 (EMFILE)."""
    svc = Service("--runner", "local", "--http-workers", "1", "--http-threads", "700",
                  "--max-resources", '{"instances": 8}').wait_ready()
    try:
        ids = [svc.client.start_instance({"type": "local"})["instance_id"] for _ in range(8)]
        barrier = threading.Barrier(700)

        def request(n):
            http = HTTPClient(svc.url)
            barrier.wait(timeout=120)  # all 700 in flight together: each takes its own waitress thread
            return http.execute(ids[n % 8], "sleep 2; echo ok", timeout=60)["output"]
        with ThreadPoolExecutor(700) as pool:
            outputs = list(pool.map(request, range(700)))
        assert outputs == ["ok\n"] * 700
    finally:
        assert svc.stop() == 0
