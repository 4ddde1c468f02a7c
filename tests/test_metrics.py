"""GET /metrics against a real service: parsed back with prometheus_client's own parsers."""

import http.client
import os
import shutil
import signal
import subprocess
import threading
import urllib.parse

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from arservice import protocol
from arservice.client import ServiceError

from helpers import Service, wait_for

pytestmark = pytest.mark.timeout(90)

TOKEN = "metrics-test-token"
START_WAIT_S = 1.5


@pytest.fixture(scope="module")
def service():
    svc = Service("--runner", "local", "--agents", "2", "--max-resources", '{"instances": 6}',
                  "--agent-timeout", "2", "--start-wait", str(START_WAIT_S), token=TOKEN).wait_ready(agents=2)
    yield svc
    assert svc.stop() == 0


def get(service, path, token=TOKEN, accept=None):
    url = urllib.parse.urlsplit(service.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if accept:
        headers["Accept"] = accept
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def scrape(service):
    """Every sample as {(name, frozenset of labels): value}."""
    status, _, text = get(service, "/metrics")
    assert status == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def test_a_start_execute_close_cycle_moves_the_metrics(service):
    client = service.http
    before = scrape(service)
    inst = client.start_instance({"type": "local"})
    instance_id, agent = inst["instance_id"], inst["agent_id"]
    try:
        started = scrape(service)
        running = {"state": "running", "type": "local", "agent": agent}
        assert value(started, "arservice_instances", **running) == value(before, "arservice_instances", **running) + 1
        assert value(started, "arservice_instance_starts_total", type="local", outcome="ok") == \
            value(before, "arservice_instance_starts_total", type="local", outcome="ok") + 1
        assert value(started, "arservice_instance_start_duration_seconds_count", type="local") == \
            value(before, "arservice_instance_start_duration_seconds_count", type="local") + 1
        assert value(started, "arservice_pool_used_instances") == value(before, "arservice_pool_used_instances") + 1
        assert value(started, "arservice_agent_used_instances", agent=agent) == \
            value(before, "arservice_agent_used_instances", agent=agent) + 1

        assert client.execute(instance_id, "sleep 0.2; exit 3")["returncode"] == 3
        assert client.execute(instance_id, "sleep 30", timeout=0.3)["timed_out"]
        with pytest.raises(ServiceError):
            client.execute(instance_id, "true", cwd="/nonexistent/dir")  # the agent refuses it
        executed = scrape(service)
        for outcome in ("ok", "timed_out"):
            assert value(executed, "arservice_commands_total", type="local", outcome=outcome) == \
                value(started, "arservice_commands_total", type="local", outcome=outcome) + 1
        failed = [k for k, v in executed.items() if k[0] == "arservice_commands_total"
                  and dict(k[1])["outcome"] not in ("ok", "timed_out") and v > started.get(k, 0)]
        assert len(failed) == 1, failed
        code = dict(failed[0][1])["outcome"]
        assert value(executed, "arservice_errors_total", request="execute", code=code) == \
            value(started, "arservice_errors_total", request="execute", code=code) + 1
        count = "arservice_command_duration_seconds_count"
        assert value(executed, count, type="local") == value(started, count, type="local") + 3
        # Both commands that ran took at least 0.2 s: the sum says so, and the 0.1 s bucket did not get them.
        assert value(executed, "arservice_command_duration_seconds_sum", type="local") >= \
            value(started, "arservice_command_duration_seconds_sum", type="local") + 0.5
        bucket = "arservice_command_duration_seconds_bucket"
        assert value(executed, bucket, type="local", le="0.1") <= value(started, bucket, type="local", le="0.1") + 1
        assert value(executed, bucket, type="local", le="+Inf") == value(executed, count, type="local")
    finally:
        client.close_instance(instance_id)
    closed = scrape(service)
    assert value(closed, "arservice_instance_closes_total", type="local", outcome="ok") == \
        value(before, "arservice_instance_closes_total", type="local", outcome="ok") + 1
    assert value(closed, "arservice_instances", **running) == value(before, "arservice_instances", **running)
    assert value(closed, "arservice_pool_used_instances") == value(before, "arservice_pool_used_instances")
    with pytest.raises(ServiceError):
        client.execute(instance_id, "true")
    refused = scrape(service)
    assert value(refused, "arservice_errors_total", request="execute", code="not_found") == \
        value(closed, "arservice_errors_total", request="execute", code="not_found") + 1


def test_waiting_starts_and_their_refusal(service):
    """A start for a backend no agent offers waits --start-wait seconds, shown as waiting, then is refused."""
    spec = {"type": "enroot", "image": "docker://busybox"}  # the test host's agents do not offer enroot
    before = scrape(service)
    outcome = {}

    def start():
        try:
            service.http.start_instance(spec)
        except ServiceError as exc:
            outcome["code"] = exc.code
    thread = threading.Thread(target=start)
    thread.start()
    try:
        wait_for(lambda: value(scrape(service), "arservice_waiting_starts", type="enroot") == 1, timeout=START_WAIT_S,
                 what="the start to show as waiting")
    finally:
        thread.join(timeout=30)
    assert outcome == {"code": "no_capacity"}
    after = scrape(service)
    assert value(after, "arservice_waiting_starts", type="enroot") == 0
    assert value(after, "arservice_errors_total", request="start_instance", code="no_capacity") == \
        value(before, "arservice_errors_total", request="start_instance", code="no_capacity") + 1


def test_made_up_message_types_do_not_become_labels(service):
    before = scrape(service)
    for i in range(3):
        with pytest.raises(ServiceError) as err:
            service.client.request(f"made-up-{i}")
        assert err.value.code == "invalid_request"
    after = scrape(service)
    assert value(after, "arservice_errors_total", request="unknown", code="invalid_request") == \
        value(before, "arservice_errors_total", request="unknown", code="invalid_request") + 3
    assert not [k for k in after if "made-up" in str(k)]


def test_a_lost_agent_is_counted_and_its_replacement_registered(service):
    before = scrape(service)
    victim = service.agent_pids()[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        now = scrape(service)
        return (value(now, "arservice_agents_lost_total", expected="false") ==
                value(before, "arservice_agents_lost_total", expected="false") + 1 and
                value(now, "arservice_agents_registered_total") == value(before, "arservice_agents_registered_total") + 1
                and value(now, "arservice_agents", state="active") == 2)
    wait_for(replaced, timeout=30, interval=0.2, what="the lost agent counted and the runner's new one registered")
    assert victim not in service.agent_pids()


def test_slurm_jobs_come_from_the_runner_report(service):
    """A runner reports its jobs with `runner_status` (the Slurm runner does, every change): the
    metrics show them. Sent here as a runner would, on the broker's own ZMQ socket."""
    report = {"runner": "slurm", "jobs": {"pending": 2, "running": 3, "odd": "many"}, "submitted": 7, "lost": 1,
              "released": [2], "job_list": []}
    service.client.request("runner_status", status=report)
    try:
        samples = scrape(service)
        assert value(samples, "arservice_slurm_jobs", state="pending") == 2
        assert value(samples, "arservice_slurm_jobs", state="running") == 3
        assert value(samples, "arservice_slurm_jobs_submitted_total") == 7
        assert value(samples, "arservice_slurm_jobs_lost_total") == 1
        # What is not a number in a report is left out, and the rest still renders.
        assert ("arservice_slurm_jobs", frozenset({("state", "odd")})) not in samples
        assert ("arservice_slurm_jobs_released_total", frozenset()) not in samples
    finally:
        service.client.request("runner_status", status={"runner": "local"})
    assert not [k for k in scrape(service) if k[0].startswith("arservice_slurm_")]


def test_names_types_and_help_follow_prometheus_conventions(service):
    status, content_type, text = get(service, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("arservice_")}
    expected = {
        "arservice_instances": "gauge", "arservice_instance_starts": "counter", "arservice_commands": "counter",
        "arservice_instance_closes": "counter", "arservice_errors": "counter", "arservice_agents": "gauge",
        "arservice_instance_start_duration_seconds": "histogram", "arservice_command_duration_seconds": "histogram",
        "arservice_agents_registered": "counter", "arservice_agents_lost": "counter",
        "arservice_waiting_starts": "gauge", "arservice_pool_capacity_instances": "gauge",
        "arservice_pool_used_instances": "gauge", "arservice_agent_capacity_instances": "gauge",
        "arservice_broker_loop_lag_seconds": "histogram", "arservice_slurm_jobs": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    for family in families.values():
        assert family.documentation, f"{family.name} has no HELP"
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
    # The loop ticks every 100 ms, and each tick measures its own lateness.
    lag = {s.name: s.value for s in families["arservice_broker_loop_lag_seconds"].samples}
    assert lag["arservice_broker_loop_lag_seconds_count"] > 0
    assert "process_resident_memory_bytes" in text  # the service process's own, from prometheus_client
    # Scrapers that ask for OpenMetrics get it, and it parses as such.
    status, content_type, text = get(service, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert "arservice_instances" in {f.name for f in parse_openmetrics(text)}


@pytest.mark.daemon  # Slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (scripts/setup.sh installs it)")
def test_slurm_jobs_of_a_real_slurm_runner():
    svc = Service("--runner", "slurm", "--max-resources", '{"jobs": 1}', "--slurm-min-jobs", "1",
                  "--slurm-instances", "1", token=TOKEN).wait_ready(agents=0)
    job_name = None
    try:
        job_name = svc.client.available_resources()["runner"]["job_name"]

        def job_running_and_registered():  # as the runner last reported it (it polls every 0.2 s)
            jobs = svc.http.status()["runner"]["job_list"]
            samples = scrape(svc)
            return (jobs and jobs[0]["agent_ids"] and value(samples, "arservice_slurm_jobs", state="running") == 1
                    and value(samples, "arservice_slurm_jobs_submitted_total") == 1
                    and value(samples, "arservice_agents", state="active") == 1 and jobs)
        jobs = wait_for(job_running_and_registered, timeout=60, interval=0.2, what="the min job running, its agent registered")
        agent = svc.client.available_resources()["agents"][0]
        assert [(j["state"], j["agent_ids"], str(j["slurm_job_id"])) for j in jobs] == \
            [("running", [agent["agent_id"]], str(agent["slurm_job_id"]))]
    finally:
        output = svc.output()
        assert svc.stop() == 0, output
        if job_name:
            subprocess.run(["scancel", f"--name={job_name}"], check=True)  # a failed test leaves no job either


@pytest.mark.parametrize("token", [None, "wrong"])
def test_metrics_and_status_need_the_token(service, token):
    for path in ("/metrics", "/status"):
        status, content_type, body = get(service, path, token=token)
        assert status == 401 and "unauthorized" in body and content_type.startswith("application/json")


def test_every_request_an_agent_answers_has_its_counter():
    from arservice.agent.agent import REQUEST_HANDLERS
    from arservice.broker.metrics import ANSWER_COUNTERS, FAMILIES
    # delete_snapshot is answered by the broker itself (the agent's answer goes to nobody).
    assert set(REQUEST_HANDLERS) - {protocol.DELETE_SNAPSHOT} <= set(ANSWER_COUNTERS)
    assert set(ANSWER_COUNTERS.values()) <= set(FAMILIES)
