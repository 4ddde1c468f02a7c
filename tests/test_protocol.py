"""The wire protocol's and the spec's pure checks (protocol.py, environments/base.py) and the clients'
wait budget: no service."""

import math

import msgpack
import pytest

from arservice import environments, protocol, schemas
from arservice.client import DEFAULT_WAIT_S, EXECUTE_MARGIN_S, Calls, wait_budget
from arservice.environments.base import check_command, parse_memory_mib
from arservice.protocol import ServiceError

pytestmark = pytest.mark.timeout(10)


def frame(msg):
    return msgpack.packb(msg, use_bin_type=True)


def code_of(call):
    with pytest.raises(ServiceError) as err:
        call()
    return err.value.code, err.value.message


def test_a_message_round_trips_and_a_multipart_split_joins_back():
    msg = protocol.request(protocol.EXECUTE, 7, command="true", raw=b"\0\xff")
    assert protocol.decode(protocol.encode(msg)) == msg
    big = b"x" * (protocol.MAX_FRAME_BYTES * 2 + 5)
    parts = protocol.split(big)
    assert [len(p) for p in parts] == [protocol.MAX_FRAME_BYTES, protocol.MAX_FRAME_BYTES, 5]
    assert protocol.joined(parts) == big
    assert protocol.split(b"small") == [b"small"]


@pytest.mark.parametrize("raw, code, words", [
    (b"\xc1", "invalid_request", "not msgpack"),
    (frame([1, 2]), "invalid_request", "must be a map"),
    (frame({"type": "ping", "id": 1}), "unsupported_version", "version None"),
    (frame({"v": 2, "type": "ping"}), "unsupported_version", "use 1"),
    (frame({"v": 1, "type": 5}), "invalid_request", "'type' must be a string"),
    (frame({"v": 1}), "invalid_request", "'type' must be a string"),
])
def test_decode_names_what_is_wrong_with_a_frame(raw, code, words):
    got, message = code_of(lambda: protocol.decode(raw))
    assert got == code and words in message


def test_peek_reads_the_envelope_and_skips_the_rest_unparsed():
    msg = protocol.request(protocol.PING, 3, token="t", payload=[{}] * 100_000)
    assert protocol.peek(frame(msg)) == {"v": 1, "type": "ping", "id": 3, "token": "t"}
    # More fields than any message has is refused before any is parsed.
    many = {f"k{i}": i for i in range(protocol.MAX_FIELDS + 1)} | {"v": 1, "type": "ping"}
    assert code_of(lambda: protocol.peek(frame(many)))[0] == "invalid_request"
    # An envelope field too big to be a token is refused, not built.
    huge = {"v": 1, "type": "ping", "token": "x" * (protocol.MAX_ENVELOPE_ITEM + 1)}
    assert code_of(lambda: protocol.peek(frame(huge)))[0] == "invalid_request"


def test_encode_refuses_what_msgpack_cannot_carry_as_a_bad_request():
    for value in (1 << 64, "\udc80", object()):
        assert code_of(lambda value=value: protocol.encode({"x": value}))[0] == "invalid_request"


BIG = protocol.MAX_ENVELOPE_ITEM + 1


@pytest.mark.parametrize("length", [BIG, 1 << 8, 1 << 16, 1 << 20])  # each msgpack length width, and past it
def test_skim_leaves_out_large_strings_and_bytes_and_readdressed_passes_them_on_unchanged(length):
    answer = protocol.reply("b7", {"output": b"o" * length, "returncode": 2, "timed_out": True, "note": "n" * length,
                                   "info": {"deep": "d" * BIG}, "small": "ok"})
    skimmed, spans = protocol.skim(frame(answer))
    large = None if length >= BIG else "n" * length
    assert skimmed["result"] == {"output": None if length >= BIG else b"o" * length, "returncode": 2, "timed_out": True,
                                 "note": large, "info": {"deep": "d" * BIG}, "small": "ok"}
    assert [name for name, _, _ in spans] == ["v", "type", "id", "result"]
    assert protocol.decode(protocol.readdressed(frame(answer), spans, {"client": [1]})) == {**answer, "id": {"client": [1]}}


def test_skim_refuses_what_is_not_a_message():
    for raw in (b"", b"\x93\x01\x02\x03", frame({"v": 1, "type": "reply", "id": 1})[:-1], frame({"v": 2, "type": "reply"})):
        assert code_of(lambda raw=raw: protocol.skim(raw))[0] in ("invalid_request", "unsupported_version")


def test_a_large_message_encodes_in_place_to_the_same_bytes():
    msg = protocol.reply(1, {"output": b"x" * protocol.PACK_IN_PLACE_BYTES, "text": "t" * 100})
    packed = protocol.encode(msg)
    assert isinstance(packed, memoryview)  # the packer's own buffer, sized for it: no doubling, no copy
    assert bytes(packed) == msgpack.packb(msg, use_bin_type=True)


def test_joined_refuses_more_than_the_largest_message():
    parts = [b"x" * protocol.MAX_FRAME_BYTES] * (protocol.MAX_MESSAGE_BYTES // protocol.MAX_FRAME_BYTES + 1)
    assert code_of(lambda: protocol.joined(parts))[0] == "payload_too_large"


@pytest.mark.parametrize("timeout, ok", [
    (3, True), (2.5, True), (86400, True), (True, False), (math.nan, False), (math.inf, False), ("3", False),
    (0, False), (86400.5, False), (1 << 70, False),
])
def test_a_number_field_is_strict_finite_and_bounded(timeout, ok):
    msg = {"instance_id": "i-1", "command": "true", "timeout": timeout}
    if ok:
        assert schemas.validated(schemas.Execute, msg).timeout == timeout
    else:
        code, message = code_of(lambda: schemas.validated(schemas.Execute, msg))
        assert code == "invalid_request" and message.startswith("field 'timeout' ") and repr(timeout)[:20] in message


def test_requests_take_null_as_absent_and_refuse_what_they_do_not_have():
    assert schemas.validated(schemas.Execute, {"instance_id": "i", "command": "x", "timeout": None}).timeout is None
    assert code_of(lambda: schemas.validated(schemas.Execute, {"command": "x"}))[1] == "missing required field 'instance_id'"
    assert code_of(lambda: schemas.validated(schemas.Ping, {"pong": 1}))[1] == "unknown field 'pong'"
    assert code_of(lambda: schemas.validated(schemas.Execute, {"instance_id": "i", "command": "a\0b"}))[1] == \
        "field 'command' must not contain a NUL byte, not 'a\\x00b'"
    assert "must be a session name" in code_of(lambda: schemas.validated(
        schemas.CloseSession, {"instance_id": "i", "session": "no spaces"}))[1]
    # The envelope is the protocol's: a request's model never sees it.
    ping = schemas.request_of(protocol.request(protocol.PING, 7, token="t"))
    assert isinstance(ping, schemas.Ping)


def test_what_the_broker_sends_an_agent_has_every_default_filled_in():
    fields = {"instance_id": "i", "command": "true"}
    assert schemas.validated(schemas.Execute, fields).output_limit is None
    assert "missing required field 'timeout'" in code_of(lambda: schemas.validated(schemas.AgentExecute, fields))[1]


def test_a_spec_is_its_backends_model_with_defaults():
    config = environments.backend("local").parse_config({"type": "local", "timeout": 5})
    assert (config["timeout"], config["shell"], config["output_limit"]) == (5.0, "bash", 1 << 20)
    config = environments.backend("docker").parse_config({"type": "docker", "image": "x", "memory": "1g"})
    assert (config["memory"], config["pull"], config["shell"]) == (1024, "missing", None)
    for spec, words in [({"type": "local", "imgae": "x"}, "unknown local environment field 'imgae'"),
                        ({"type": "docker"}, "missing required docker environment field 'image'"),
                        ({"type": "docker", "image": "x", "pull": "sometimes"}, "field 'pull'"),
                        ({"type": "docker", "image": "x", "run_options": {"a": [math.nan]}}, "field 'run_options'"),
                        ({"type": "local", "shell": [""]}, "field 'shell'"),
                        ({"type": "local", "cpus": 1}, "cannot enforce cpus")]:
        code, message = code_of(lambda spec=spec: environments.backend(spec["type"]).parse_config(spec))
        assert code == "invalid_request" and words in message, message


def test_check_value_finds_a_nul_or_a_non_finite_number_at_any_depth():
    assert protocol.check_value({"a": [1, "b", {"c": 2.5}]}, "spec") == {"a": [1, "b", {"c": 2.5}]}
    for bad in ({"a": ["x\0"]}, {"k\0": 1}, [[math.inf]], {"a": {"b": math.nan}}):
        code, message = code_of(lambda bad=bad: protocol.check_value(bad, "spec"))
        assert code == "invalid_request" and "'spec'" in message


@pytest.mark.parametrize("env, words", [
    ({"": "x"}, "invalid variable name"), ({"A=B": "x"}, "invalid variable name"),
    ({"A\0": "x"}, "invalid variable name"), ({"A": "x\0"}, "NUL"), ({"A": 1}, "map strings to strings"),
])
def test_environment_maps_hold_only_what_exec_can_pass(env, words):
    assert words in code_of(lambda: protocol.environment_map(env, "env"))[1]


def test_same_secret_takes_any_type_and_any_characters():
    assert protocol.same_secret("s\udc80", "s\udc80")
    assert not protocol.same_secret("s", "t")
    assert not protocol.same_secret(None, "s") and not protocol.same_secret(b"s", "s")


@pytest.mark.parametrize("value, mib", [
    (None, None), (512, 512), ("512m", 512), ("2g", 2048), ("2GiB", 2048), ("1024k", 1), (" 1T ", 1 << 20),
    ("1.5g", 1536), (1.9, 1),
])
def test_memory_sizes_parse_to_whole_mebibytes(value, mib):
    assert parse_memory_mib(value) == mib


@pytest.mark.parametrize("value", [0, -5, "0.5k", "1e400g", "Infinity", "nan", "12x", "", True, [512], 2 ** 70])
def test_memory_sizes_out_of_range_or_unreadable_are_refused(value):
    code, message = code_of(lambda: parse_memory_mib(value))
    assert code == "invalid_request" and "memory must be like" in message


@pytest.mark.parametrize("command, env, words", [
    ("echo \0", {}, "NUL"), ("true", {"A": "\0"}, "NUL"), ("true", {"1A": "x"}, "'1A'"), ("true", {"A-B": "x"}, "'A-B'"),
])
def test_commands_and_variables_no_exec_could_pass_are_refused(command, env, words):
    assert words in code_of(lambda: check_command(command, env))[1]
    check_command("echo ok", {"A_1": "x"})  # and a good one passes


@pytest.mark.parametrize("kind, fields, budget", [
    (protocol.EXECUTE, {"timeout": 10}, 10 + EXECUTE_MARGIN_S),
    (protocol.RUN_IN_SESSION, {"timeout": 2.5}, 2.5 + EXECUTE_MARGIN_S),
    (protocol.EXECUTE, {}, DEFAULT_WAIT_S + EXECUTE_MARGIN_S),
    # Time limits the broker refuses at once leave the default: nothing waits on them.
    (protocol.EXECUTE, {"timeout": -1}, DEFAULT_WAIT_S + EXECUTE_MARGIN_S),
    (protocol.EXECUTE, {"timeout": True}, DEFAULT_WAIT_S + EXECUTE_MARGIN_S),
    (protocol.EXECUTE, {"timeout": 1e20}, DEFAULT_WAIT_S + EXECUTE_MARGIN_S),
    (protocol.EXECUTE, {"timeout": "9"}, DEFAULT_WAIT_S + EXECUTE_MARGIN_S),
    (protocol.START_INSTANCE, {"wait_s": 900}, DEFAULT_WAIT_S + 900),
    (protocol.START_INSTANCE, {}, DEFAULT_WAIT_S),
    (protocol.FORK_INSTANCE, {"count": 3}, 2 * DEFAULT_WAIT_S),
    (protocol.PING, {"timeout": 5}, DEFAULT_WAIT_S),
])
def test_one_wait_budget_rule_for_every_request(kind, fields, budget):
    assert wait_budget(kind, fields) == budget


def test_client_calls_take_their_wait_from_the_one_rule():
    assert Calls.execute("i", "true", timeout=7).wait_s == 7 + EXECUTE_MARGIN_S
    assert Calls.start_instance("preset", wait_s=60).wait_s == DEFAULT_WAIT_S + 60
    assert Calls.ping().wait_s == DEFAULT_WAIT_S
