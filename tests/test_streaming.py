"""Streamed output against the real service: chunks in order that add up to the answer, the answer
equal to the unstreamed one, and a client that drops a stream half-way."""

import asyncio
import uuid

import pytest

from arservice.aio import AsyncHTTPClient, AsyncZMQClient
from arservice.client import ServiceError

from backends import SPECS, params
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)

BIG = "seq 1 1500000"  # 10.9 MB, deterministic
BIG_LIMIT = 16 << 20


@pytest.fixture(params=["zmq", "http"])
def client(request, one_agent_service):
    return one_agent_service.client if request.param == "zmq" else one_agent_service.http


def split(events):
    events = list(events)
    assert all(isinstance(e, bytes) for e in events[:-1]) and isinstance(events[-1], dict)
    return events[:-1], events[-1]


def same_answer(a, b):
    return {k: v for k, v in a.items() if k != "duration_s"} == {k: v for k, v in b.items() if k != "duration_s"}


@pytest.mark.parametrize("backend", params("local", "local-fast", "docker-bookworm"))
def test_ten_megabytes_arrive_in_order_and_add_up_to_the_answer(one_agent_service, client, backend):
    inst = client.start_instance(SPECS[backend])["instance_id"]
    try:
        chunks, answer = split(client.execute_stream(inst, BIG, output_limit=BIG_LIMIT, raw=True))
        assert len(chunks) > 1
        assert b"".join(chunks) == answer["output"]
        full = "".join(f"{i}\n" for i in range(1, 1500001)).encode()
        assert answer["output"] == full
        assert same_answer(answer, client.execute(inst, BIG, output_limit=BIG_LIMIT, raw=True))
        client.create_session(inst)
        chunks, answer = split(client.run_in_session_stream(inst, "default", BIG, output_limit=BIG_LIMIT, raw=True))
        assert b"".join(chunks) == answer["output"]
        assert same_answer(answer, client.run_in_session(inst, "default", BIG, output_limit=BIG_LIMIT, raw=True))
        # Past the output limit the answer keeps head and tail, as unstreamed; the chunks have it all.
        chunks, answer = split(client.execute_stream(inst, BIG, output_limit=1000, raw=True))
        assert answer["truncated"] and b"".join(chunks) == full
    finally:
        client.close_instance(inst)


def test_a_timed_out_stream_ends_with_the_timed_out_answer(one_agent_service, client):
    inst = client.start_instance({"type": "local"})["instance_id"]
    try:
        client.create_session(inst)
        chunks, answer = split(client.run_in_session_stream(inst, "default", "echo a; sleep 30; echo b", timeout=0.5,
                                                            raw=True))
        assert (b"".join(chunks), answer["output"], answer["timed_out"]) == (b"a\n", b"a\n", True)
    finally:
        client.close_instance(inst)


def test_a_client_dropping_a_stream_half_way_leaks_nothing(one_agent_service, client):
    inst = client.start_instance({"type": "local"})["instance_id"]
    mark = f"done{uuid.uuid4().hex[:8]}"
    try:
        stream = client.execute_stream(inst, f"for i in $(seq 1 20); do echo $i; sleep 0.05; done; touch {mark}")
        assert next(stream) == b"1\n"
        stream.close()
        # The command keeps its semantics (it runs to its end), and the client's next calls are answered
        # as if nothing had happened (the dropped stream's late chunks go nowhere).
        wait_for(lambda: client.execute(inst, f"test -e {mark}")["returncode"] == 0, 10, what="the command's end")
        assert client.execute(inst, "echo next")["output"] == "next\n"
        client.create_session(inst)
        stream = client.run_in_session_stream(inst, "default", "echo 1; sleep 0.3; echo 2")
        next(stream)
        stream.close()
        wait_for(lambda: session_free(client, inst), 10, what="the session free again")
    finally:
        client.close_instance(inst)


def session_free(client, inst):
    """Whether the session runs a new command (not while the dropped one still runs)."""
    try:
        return client.run_in_session(inst, "default", "echo free")["output"] == "free\n"
    except ServiceError as exc:
        if exc.code != "conflict":
            raise
        return False


@pytest.mark.parametrize("kind", ["zmq", "http"])
def test_async_clients_stream(one_agent_service, kind):
    async def scenario():
        svc = one_agent_service
        async with (AsyncZMQClient(svc.zmq, token="") if kind == "zmq" else AsyncHTTPClient(svc.url, token="")) as c:
            inst = (await c.start_instance({"type": "local"}))["instance_id"]
            try:
                events = [e async for e in c.execute_stream(inst, "echo 1; sleep 0.1; echo 2", raw=True)]
                assert events[:-1] == [b"1\n", b"2\n"] and events[-1]["output"] == b"1\n2\n"
                # Chunks bigger than a line aiohttp would read whole (512 KiB).
                events = [e async for e in c.execute_stream(inst, "seq 1 300000", output_limit=4 << 20, raw=True)]
                assert b"".join(events[:-1]) == events[-1]["output"] == "".join(f"{i}\n" for i in range(1, 300001)).encode()
                await c.create_session(inst)
                events = [e async for e in c.run_in_session_stream(inst, "default", "echo x", raw=True)]
                assert b"".join(events[:-1]) == events[-1]["output"] == b"x\n"
            finally:
                await c.close_instance(inst)
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", params("docker-plain-exec"))
def test_without_the_exec_helper_a_stream_is_the_answer_alone(one_agent_service, backend):
    """A documented difference: commands without the exec helper (fast_exec: false) send no chunks;
    the stream still ends with the same answer as the unstreamed call."""
    client = one_agent_service.client
    inst = client.start_instance(SPECS[backend])["instance_id"]
    try:
        chunks, answer = split(client.execute_stream(inst, "seq 1 3; echo done >&2", raw=True))
        assert chunks == [] and answer["output"] == b"1\n2\n3\ndone\n"
        assert same_answer(answer, client.execute(inst, "seq 1 3; echo done >&2", raw=True))
    finally:
        client.close_instance(inst)
