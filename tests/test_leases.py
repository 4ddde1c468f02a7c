"""Leases: an instance nobody uses or renews is closed and says `expired`; starts wait for room in turn."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arservice.client import ServiceError

from backends import SPECS, params
from helpers import Service, live_processes, wait_for

pytestmark = pytest.mark.timeout(90)


def state(svc, instance_id):
    return {i["instance_id"]: i["state"] for i in svc.client.instances()}.get(instance_id)


def refused(call, *args, **kwargs):
    with pytest.raises(ServiceError) as err:
        call(*args, **kwargs)
    return err.value.code


def expired_count(svc, reason):
    for name, _, _, _, samples in svc.client.request("metrics")["families"]:
        if name == "arservice_instances_expired_total":
            return sum(value for labels, value in samples if labels == [reason])
    return 0


@pytest.fixture(scope="module")
def svc():
    service = Service("--runner", "local", "--max-resources", '{"instances": 4}', "--idle-timeout", "2").wait_ready()
    yield service
    assert service.stop() == 0


def test_an_idle_instance_expires_and_its_processes_go(svc):
    inst = svc.client.start_instance({"type": "local"})["instance_id"]
    svc.client.execute(inst, "nohup sleep 300 >/dev/null 2>&1 & echo $! > pid")
    daemon = svc.client.read_file(inst, "pid").decode().strip()
    assert live_processes("sleep 300") and daemon
    before = expired_count(svc, "idle")
    wait_for(lambda: state(svc, inst) == "expired", timeout=10, what="the idle instance to expire")
    assert refused(svc.client.execute, inst, "true") == "expired"
    assert refused(svc.http.execute, inst, "true") == "expired"
    assert refused(svc.client.renew, inst) == "expired"
    wait_for(lambda: svc.client.available_resources()["used"]["instances"] == 0, timeout=10, what="capacity back")
    wait_for(lambda: not [p for p in live_processes("sleep 300") if str(p) == daemon], timeout=10,
             what="the instance's daemon to end")
    assert expired_count(svc, "idle") == before + 1
    assert svc.client.close_instance(inst) == {"instance_id": inst, "closed": True, "expired": True}
    assert "instance_expired" in svc.output()


def test_requests_and_renewals_keep_an_instance(svc):
    kept = svc.client.start_instance({"type": "local"})["instance_id"]
    left = svc.client.start_instance({"type": "local"})["instance_id"]
    with svc.client.keep_alive(kept, every_s=0.3) as keeper:
        wait_for(lambda: state(svc, left) == "expired", timeout=10, what="the unrenewed instance to expire")
        started = time.monotonic()
        # A command longer than the idle timeout is use, not idleness.
        assert svc.client.execute(kept, "sleep 3; echo done", timeout=10)["output"] == "done\n"
        assert time.monotonic() - started > 2
        assert state(svc, kept) == "running" and not keeper.errors
    assert svc.client.renew(kept)["idle_timeout"] == 2
    svc.client.close_instance(kept)


def test_ttl_is_a_hard_lifetime_that_renew_can_move(svc):
    inst = svc.client.start_instance({"type": "local", "ttl": 1.5, "idle_timeout": 60})["instance_id"]
    lease = svc.client.renew(inst, ttl=30)
    assert lease["idle_timeout"] == 60 and 25 < lease["expires_in_s"] <= 30
    short = svc.client.start_instance({"type": "local", "ttl": 1, "idle_timeout": 60})["instance_id"]
    before = expired_count(svc, "ttl")
    with svc.client.keep_alive(short, every_s=0.2):  # renewing does not extend a ttl
        wait_for(lambda: state(svc, short) == "expired", timeout=10, what="the ttl to end")
    assert expired_count(svc, "ttl") == before + 1
    assert state(svc, inst) == "running"
    assert refused(svc.client.start_instance, {"type": "local", "ttl": -1}) == "invalid_request"
    assert refused(svc.client.renew, inst, ttl="soon") == "invalid_request"
    svc.client.close_instance(inst)


def test_starts_wait_for_room_first_come_first_served(svc):
    wait_for(lambda: svc.client.available_resources()["used"]["instances"] == 0, timeout=10, what="an empty service")
    held = [svc.client.start_instance({"type": "local", "idle_timeout": 60})["instance_id"] for _ in range(4)]
    assert refused(svc.client.start_instance, {"type": "local"}) == "no_capacity"  # the default: no wait
    started = time.monotonic()
    assert refused(svc.client.start_instance, {"type": "local"}, wait_s=1) == "no_capacity"
    assert time.monotonic() - started >= 0.9
    order = []

    def start(name):
        inst = svc.client.start_instance({"type": "local", "idle_timeout": 60}, wait_s=30)["instance_id"]
        order.append(name)
        return inst

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(start, "first")
        wait_for(lambda: svc.client.available_resources()["waiting"]["starts"] == 1, timeout=10, what="one waiting")
        second = pool.submit(start, "second")
        wait_for(lambda: svc.client.available_resources()["waiting"]["starts"] == 2, timeout=10, what="two waiting")
        svc.client.close_instance(held.pop())
        wait_for(lambda: order == ["first"], timeout=10, what="the first waiting start to get the room")
        assert svc.client.available_resources()["waiting"]["starts"] == 1
        svc.client.close_instance(held.pop())
        held += [first.result(timeout=10), second.result(timeout=10)]
    assert order == ["first", "second"]
    for inst in held:
        svc.client.close_instance(inst)


@pytest.mark.parametrize("name", params("docker-busybox"))
def test_a_container_that_ended_is_lost_and_frees_its_capacity(svc, name):
    spec = dict(SPECS[name], container_timeout=8, idle_timeout=60)
    inst = svc.client.start_instance(spec)["instance_id"]
    used = svc.client.available_resources()["used"]["instances"]
    # Past container_timeout the container ended and is not revived: the instance is lost, not running.
    def gone():
        try:
            svc.client.execute(inst, "true")
        except ServiceError as exc:
            return exc.code
        return None
    assert wait_for(gone, timeout=40, interval=0.5, what="the container to end") == "instance_lost"
    assert state(svc, inst) == "lost"
    assert svc.client.available_resources()["used"]["instances"] == used - 1
    assert refused(svc.client.execute, inst, "true") == "agent_lost"
    assert svc.client.close_instance(inst)["lost"] is True
