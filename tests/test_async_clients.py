"""The asyncio clients against the real service: every method, and 1,000 commands from one loop."""

import asyncio
import inspect

import pytest

from arservice import client as sync_client
from arservice.aio import AsyncHTTPClient, AsyncZMQClient
from arservice.client import METHODS, ServiceError

from helpers import Service

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["zmq", "http"])
def make_client(request, service):
    if request.param == "zmq":
        return lambda: AsyncZMQClient(service.zmq, token="")
    return lambda: AsyncHTTPClient(service.url, token="")


def test_async_clients_have_the_sync_methods_with_the_same_signatures():
    for name in METHODS:
        sync_sig = inspect.signature(getattr(sync_client.ZMQClient, name))
        for cls in (AsyncZMQClient, AsyncHTTPClient):
            method = getattr(cls, name)
            assert inspect.iscoroutinefunction(method), f"{cls.__name__}.{name}"
            assert inspect.signature(method) == sync_sig, f"{cls.__name__}.{name}"
    assert {"start_instance", "execute", "write_file", "read_file", "close_instance",
            "available_resources", "instances", "ping"} <= set(METHODS)
    # Bound, they take what the declaration takes (introspection must not lose the first argument).
    bound = AsyncZMQClient("tcp://127.0.0.1:1", token="").execute
    assert list(inspect.signature(bound).parameters)[:2] == ["instance_id", "command"]
    assert list(inspect.signature(sync_client.ZMQClient("tcp://127.0.0.1:1").execute).parameters)[:2] == [
        "instance_id", "command"]


def test_every_method(make_client):
    async def scenario():
        async with make_client() as client:
            assert isinstance(await client.ping(), dict)
            inst = await client.start_instance({"type": "local"})
            iid = inst["instance_id"]
            try:
                result = await client.execute(iid, "printf 'caf\\xc3\\xa9 \\xff'; echo err >&2; exit 3", env={"A": "x"})
                assert result["output"] == "café \ufffderr\n" and result["returncode"] == 3
                raw = await client.execute(iid, "printf '\\xff\\x00'", raw=True)
                assert raw["output"] == b"\xff\x00"
                timed = await client.execute(iid, "echo started; sleep 30", timeout=1)
                assert timed["timed_out"] is True and timed["output"] == "started\n"
                assert (await client.write_file(iid, "f.bin", b"\x00\x01\xfe"))["written"] == 3
                assert await client.read_file(iid, "f.bin") == b"\x00\x01\xfe"
                assert any(i["instance_id"] == iid for i in await client.instances())
                assert "agents" in await client.available_resources()
            finally:
                assert (await client.close_instance(iid))["closed"] is True
            with pytest.raises(ServiceError) as err:
                await client.execute(iid, "true")
            assert err.value.code == "not_found"
    asyncio.run(scenario())


def test_one_thousand_concurrent_commands_from_one_loop(make_client):
    async def scenario():
        async with make_client() as client:
            instances = [(await client.start_instance({"type": "local"}))["instance_id"] for _ in range(4)]
            try:
                results = await asyncio.gather(*(
                    client.execute(instances[i % 4], f"echo {i}; sleep 0.2; exit $(({i} % 7))", timeout=60)
                    for i in range(1000)))
            finally:
                for iid in instances:
                    await client.close_instance(iid)
            # Each coroutine got its own answer, not another's.
            assert [r["output"] for r in results] == [f"{i}\n" for i in range(1000)]
            assert [r["returncode"] for r in results] == [i % 7 for i in range(1000)]
    asyncio.run(scenario())


def test_a_client_serves_one_loop_after_another(make_client):
    client = make_client()

    async def ping():
        return await client.ping()

    assert asyncio.run(ping()) == asyncio.run(ping())
    asyncio.run(client.aclose())


def test_wait_budget_is_a_timeout_error(service):
    async def scenario():
        client = AsyncZMQClient("tcp://127.0.0.1:1", token="")  # nothing listens there
        try:
            with pytest.raises(ServiceError) as err:
                await client.request("ping", wait_s=0.3)
            assert err.value.code == "timeout"
        finally:
            await client.aclose()
    asyncio.run(scenario())


def test_the_token_is_sent_and_a_wrong_one_refused():
    svc = Service("--runner", "local", token="s3cret").wait_ready()
    try:
        async def scenario():
            for make in (lambda t: AsyncZMQClient(svc.zmq, token=t), lambda t: AsyncHTTPClient(svc.url, token=t)):
                async with make("s3cret") as client:
                    assert (await client.available_resources())["agents"]
                async with make("wrong") as client:
                    with pytest.raises(ServiceError) as err:
                        await client.available_resources()
                    assert err.value.code == "unauthorized"
        asyncio.run(scenario())
    finally:
        assert svc.stop() == 0
