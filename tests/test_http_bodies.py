"""The HTTP front end's JSON bodies, as pure functions: an answer written in pieces reads back as
the whole of it would, and a request body parses as json.loads parses it."""

import base64
import json

import pytest

from arservice.http.app import PIECE_BYTES, json_pieces, parse_body
from arservice.protocol import ServiceError

EURO = "€".encode()  # three bytes: placed to straddle a piece boundary


@pytest.mark.parametrize("data", [
    b"",
    b"plain",
    b"x" * (PIECE_BYTES - 1) + EURO + b"y",  # a character split between two pieces
    b"x" * (PIECE_BYTES - 2) + b"\xff\xfe" + EURO * 3,  # invalid bytes next to the boundary
    bytes(range(256)) * (PIECE_BYTES // 100),  # control characters and quotes to escape, several pieces
    b'"\\\n\t\x00' * 1000 + EURO[:2],  # a character cut off at the very end
])
@pytest.mark.parametrize("use_base64", [False, True])
def test_an_answer_in_pieces_reads_back_as_the_whole(data, use_base64):
    result = {"returncode": 3, "output": data, "timed_out": False}
    body = b"".join(json_pieces(dict(result), "output", use_base64))
    text = base64.b64encode(data).decode() if use_base64 else data.decode("utf-8", errors="replace")
    assert json.loads(body) == {**result, "output": text}


def test_answers_without_bytes_are_one_piece():
    assert json_pieces({"pong": True}, None, False) == [b'{"pong": true}']
    assert json.loads(b"".join(json_pieces({}, "content", False))) == {}
    with pytest.raises(ValueError):
        json_pieces({"x": float("nan")}, None, False)  # never valid JSON out


@pytest.mark.parametrize("raw", [b'{"a": [1, "\\u20ac"]}', '{"a": [1, "€"]}'.encode("utf-16"), b""])
def test_a_body_parses_as_json_loads_would(raw):
    assert parse_body(raw) == (json.loads(raw) if raw else {})


@pytest.mark.parametrize("raw", [b"\xff\xfe\xfd{", b"[1]", b'{"a": NaN}', b'{"a": 1e999}', b"{" * 100_000])
def test_a_bad_body_is_invalid_request(raw):
    with pytest.raises(ServiceError) as err:
        parse_body(raw)
    assert err.value.code == "invalid_request"
