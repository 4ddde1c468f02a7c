"""models/: each client against a local server speaking its provider's wire format."""

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from arservice.models import CostLimitExceeded, CostTracker, ModelError, PriceTable, get_model

from helpers import run_in_threads
from provider_server import ProviderServer, anthropic_error, anthropic_reply, openai_error, openai_reply

KEY = "sk-test-secret-key-1234"
HELLO = [{"role": "user", "content": "hi"}]
FAST = {"backoff_s": 0.01, "max_backoff_s": 1.0}


@pytest.fixture
def server():
    server = ProviderServer()
    yield server
    server.close()


def openai_model(server, **kwargs):
    return get_model({"model_class": "openai", "model_name": "gpt-4o", "api_key": KEY,
                      "base_url": server.url + "/v1", **FAST, **kwargs})


def anthropic_model(server, **kwargs):
    return get_model({"model_class": "anthropic", "model_name": "claude-sonnet-4-20250514", "api_key": KEY,
                      "base_url": server.url, **FAST, **kwargs})


def test_openai_request_and_answer_with_cost_from_the_price_table(server):
    server.script((200, openai_reply("the answer", prompt_tokens=1000, completion_tokens=500, cached_tokens=200)))
    model = openai_model(server, model_kwargs={"temperature": 0.5, "max_tokens": 100})
    answer = model.query(HELLO, temperature=0.0)
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "gpt-4o", "messages": HELLO, "temperature": 0.0, "max_tokens": 100}
    assert answer["content"] == "the answer" and answer["finish_reason"] == "stop"
    assert answer["usage"] == {"input_tokens": 1000, "output_tokens": 500, "cached_tokens": 200, "cache_write_tokens": 0}
    # gpt-4o: $2.5 / M input, $1.25 / M cached input, $10 / M output
    assert answer["cost"] == pytest.approx((800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)
    assert model.totals.snapshot()["calls"] == 1 and model.totals.cost == pytest.approx(answer["cost"])


def test_openai_compatible_server_without_a_key_gets_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = get_model({"model_class": "openai", "model_name": "local-llama", "base_url": server.url + "/v1",
                       "cost_tracking": "ignore"})
    assert model.query(HELLO)["cost"] == 0.0
    assert "authorization" not in server.requests[0]["headers"]


def test_openrouter_asks_for_usage_accounting_and_takes_the_cost_it_reports(server):
    server.script((200, openai_reply(prompt_tokens=1000, completion_tokens=500, cost=0.0123)))
    model = get_model({"model_class": "openrouter", "model_name": "gpt-4o", "api_key": KEY, "base_url": server.url + "/api/v1"})
    answer = model.query(HELLO)
    assert server.requests[0]["path"] == "/api/v1/chat/completions"
    assert server.requests[0]["body"]["usage"] == {"include": True}
    assert answer["cost"] == 0.0123  # the provider's figure, not the table's


def test_openrouter_error_inside_a_200_and_missing_key(server, monkeypatch):
    server.script((200, {"error": {"code": 402, "message": "Insufficient credits"}}))
    model = get_model({"model_class": "openrouter", "model_name": "x/y", "api_key": KEY, "base_url": server.url, **FAST})
    with pytest.raises(ModelError) as err:
        model.query(HELLO)
    assert (err.value.provider, err.value.status) == ("openrouter", 402) and "Insufficient credits" in str(err.value)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    keyless = get_model({"model_class": "openrouter", "model_name": "x/y", "base_url": server.url})
    with pytest.raises(ModelError, match="OPENROUTER_API_KEY"):
        keyless.query(HELLO)
    assert len(server.requests) == 1


def test_anthropic_request_prompt_caching_and_usage(server):
    server.script((200, anthropic_reply("hi there", input_tokens=100, output_tokens=50, cache_read=1000, cache_write=200)))
    model = anthropic_model(server, prompt_caching=True, model_kwargs={"temperature": 0})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "three"}]
    answer = model.query(messages)
    [request] = server.requests
    assert request["path"] == "/v1/messages"
    assert request["headers"]["x-api-key"] == KEY and request["headers"]["anthropic-version"] == "2023-06-01"
    body = request["body"]
    ephemeral = {"type": "ephemeral"}
    assert body["system"] == [{"type": "text", "text": "be brief", "cache_control": ephemeral}]
    assert body["max_tokens"] == 4096 and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "one"  # only the last two user turns carry markers
    assert body["messages"][2]["content"] == [{"type": "text", "text": "two", "cache_control": ephemeral}]
    assert body["messages"][4]["content"] == [{"type": "text", "text": "three", "cache_control": ephemeral}]
    assert answer["content"] == "hi there" and answer["finish_reason"] == "end_turn"
    assert answer["usage"] == {"input_tokens": 1300, "output_tokens": 50, "cached_tokens": 1000, "cache_write_tokens": 200}
    # sonnet 4: $3 input, $0.30 cache read, $3.75 cache write, $15 output per million
    assert answer["cost"] == pytest.approx((100 * 3 + 1000 * 0.3 + 200 * 3.75 + 50 * 15) / 1e6)


def test_anthropic_without_caching_sends_plain_messages(server):
    server.script((200, anthropic_reply()))
    anthropic_model(server).query([{"role": "system", "content": "s"}, *HELLO])
    body = server.requests[0]["body"]
    assert body["messages"] == HELLO and body["system"] == [{"type": "text", "text": "s"}]


@pytest.mark.parametrize("status", [429, 500, 503, 529])
def test_retryable_statuses_are_retried_with_growing_backoff(server, status):
    server.script((status, anthropic_error("busy", "overloaded_error")), (status, anthropic_error("busy", "overloaded_error")),
                  (200, anthropic_reply("finally")))
    model = anthropic_model(server, backoff_s=0.05)
    assert model.query(HELLO)["content"] == "finally"
    times = [r["time"] for r in server.requests]
    assert len(times) == 3
    # Jitter is x0.5-1.5 of 0.05 * 2**attempt: the waits are at least 0.025 s and then 0.05 s.
    assert times[1] - times[0] >= 0.025 and times[2] - times[1] >= 0.05


def test_retry_after_header_sets_the_wait(server):
    server.script((429, openai_error("slow down", "rate_limit_error"), {"Retry-After": "0.5"}), (200, openai_reply()))
    openai_model(server, backoff_s=0.001).query(HELLO)
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.5


@pytest.mark.parametrize("status, body, words", [
    (400, openai_error("This model's maximum context length is 8192 tokens", code="context_length_exceeded"),
     "maximum context length"),
    (401, openai_error("Incorrect API key provided", "invalid_request_error", "invalid_api_key"), "Incorrect API key"),
    (403, openai_error("not allowed", "permission_error"), "not allowed"),
    (404, openai_error("The model `gpt-9` does not exist", code="model_not_found"), "does not exist"),
])
def test_client_errors_are_not_retried_and_name_provider_status_and_message(server, status, body, words):
    server.script((status, body))
    with pytest.raises(ModelError) as err:
        openai_model(server).query(HELLO)
    assert len(server.requests) == 1
    assert err.value.status == status and err.value.provider == "openai"
    assert str(err.value).startswith(f"openai: HTTP {status}: ") and words in str(err.value)


def test_anthropic_auth_error_body_is_read(server):
    server.script((401, anthropic_error("invalid x-api-key", "authentication_error")))
    with pytest.raises(ModelError, match="anthropic: HTTP 401: authentication_error: invalid x-api-key"):
        anthropic_model(server).query(HELLO)
    assert len(server.requests) == 1


def test_retries_give_up_after_max_retries(server):
    server.script((500, b"upstream exploded"))
    with pytest.raises(ModelError, match="HTTP 500: upstream exploded") as err:
        openai_model(server, max_retries=2).query(HELLO)
    assert len(server.requests) == 3 and err.value.retryable


def test_a_negative_retry_count_is_refused_not_a_silent_none(server):
    with pytest.raises(ValueError, match="max_retries must be 0 or more, not -1"):
        openai_model(server, max_retries=-1).query(HELLO)
    assert server.requests == []


def test_timeouts_are_retried_then_reported(server):
    server.script((200, openai_reply(), {}, 30.0))
    with pytest.raises(ModelError, match="timed out after 0.3 s") as err:
        openai_model(server, timeout=0.3, max_retries=1).query(HELLO)
    assert len(server.requests) == 2 and err.value.status is None


def test_connection_refused_is_retried_then_reported(server):
    url = server.url
    server.close()
    model = get_model({"model_class": "openai", "model_name": "gpt-4o", "api_key": KEY, "base_url": url, "max_retries": 2, **FAST})
    with pytest.raises(ModelError, match="no answer: .*refused"):
        model.query(HELLO)


def test_the_key_is_never_logged_or_shown(server, caplog):
    server.script((503, openai_error("down")), (401, openai_error("bad key")))
    model = openai_model(server)
    with caplog.at_level(logging.DEBUG, logger="arservice"), pytest.raises(ModelError) as err:
        model.query(HELLO)
    assert any("retry" in r.getMessage() for r in caplog.records)  # something was logged
    assert KEY not in caplog.text and KEY not in str(err.value) and KEY not in repr(model)


def test_unknown_price_is_an_error_unless_cost_tracking_is_ignored(server, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no price for 'my-model'"):
        get_model({"model_class": "openai", "model_name": "my-model", "base_url": server.url})
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"my-model": {"input": 1.0, "output": 2.0}, "gpt-4o": {"input": 100, "output": 100}}))
    monkeypatch.setenv("ARSERVICE_MODEL_PRICES", str(prices))
    server.script((200, openai_reply(prompt_tokens=1_000_000, completion_tokens=1_000_000)))
    assert get_model({"model_class": "openai", "model_name": "my-model", "base_url": server.url}).query(HELLO)["cost"] == 3.0
    assert openai_model(server).query(HELLO)["cost"] == 200.0  # the file overrides the built-in price
    prices.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read prices from"):
        PriceTable()
    prices.write_text(json.dumps({"m": {"input": -1, "output": 1}}))
    with pytest.raises(ValueError, match="price of 'm'"):
        PriceTable()


def test_openrouter_reply_without_cost_falls_back_to_the_table_or_fails_clearly(server):
    server.script((200, openai_reply(prompt_tokens=1_000_000, completion_tokens=0)))
    known = get_model({"model_class": "openrouter", "model_name": "gpt-4o", "api_key": KEY, "base_url": server.url})
    assert known.query(HELLO)["cost"] == 2.5
    unknown = get_model({"model_class": "openrouter", "model_name": "x/y", "api_key": KEY, "base_url": server.url})
    with pytest.raises(ModelError, match="reported no cost for 'x/y'"):
        unknown.query(HELLO)


def test_call_and_cost_limits_raise_before_the_call(server):
    server.script((200, openai_reply(prompt_tokens=1_000_000, completion_tokens=0)))  # $2.50 a call
    model = openai_model(server, call_limit=2)
    model.query(HELLO), model.query(HELLO)
    with pytest.raises(CostLimitExceeded, match="call limit reached: 2 of 2"):
        model.query(HELLO)
    assert len(server.requests) == 2
    tracker = CostTracker(cost_limit=4.0)
    budgeted = openai_model(server, tracker=tracker)
    budgeted.query(HELLO), budgeted.query(HELLO)  # $2.50 then $5.00: the second starts under the limit
    with pytest.raises(CostLimitExceeded, match=r"cost limit reached: \$5.0000 spent of \$4"):
        budgeted.query(HELLO)
    assert len(server.requests) == 4


def test_totals_are_exact_under_many_threads(server):
    server.script((200, openai_reply(prompt_tokens=1000, completion_tokens=100, cached_tokens=10)))
    tracker = CostTracker()
    model = openai_model(server, tracker=tracker)
    one = model.prices.cost("gpt-4o", {"input_tokens": 1000, "output_tokens": 100, "cached_tokens": 10})
    run_in_threads(lambda _: [model.query(HELLO) for _ in range(25)], 8)
    for totals in (model.totals.snapshot(), tracker.snapshot()):
        assert totals["calls"] == 200 and totals["input_tokens"] == 200_000
        assert totals["output_tokens"] == 20_000 and totals["cached_tokens"] == 2000
        assert totals["cost"] == pytest.approx(200 * one)


def test_a_call_limit_admits_exactly_that_many_racing_threads(server):
    server.script((200, openai_reply(), {}, 0.05))
    model = openai_model(server, tracker=CostTracker(call_limit=10))
    refused = []
    barrier = threading.Barrier(40)

    def call(_):
        barrier.wait()
        try:
            model.query(HELLO)
        except CostLimitExceeded:
            refused.append(1)

    run_in_threads(call, 40)
    assert len(server.requests) == 10 and len(refused) == 30


def test_registry():
    with pytest.raises(ValueError, match="unknown model_class 'nope'"):
        get_model({"model_class": "nope", "model_name": "m"})
    with pytest.raises(ValueError, match="needs 'model_name'"):
        get_model({"model_class": "openai"})
    model = get_model({"model_class": "arservice.models.anthropic:AnthropicModel", "model_name": "claude-opus-4-20250514"})
    assert type(model).__name__ == "AnthropicModel"
    # litellm is heavy and optional: importing the models package must not import it.
    code = "import sys, arservice.models; get = arservice.models.get_model; print('litellm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.fixture
def litellm_module(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here: do not fetch its price list
    return pytest.importorskip("litellm", reason="the litellm extra is not installed (pip install 'arservice[litellm]')")


def test_litellm_against_an_openai_compatible_server(server, litellm_module):
    server.script((429, openai_error("slow down", "rate_limit_error")),
                  (200, openai_reply("via litellm", prompt_tokens=1_000_000, completion_tokens=0)))
    model = get_model({"model_class": "litellm", "model_name": "openai/arservice-test-model", "api_key": KEY,
                       "base_url": server.url + "/v1", "prices": {"openai/arservice-test-model": {"input": 1, "output": 1}},
                       **FAST})
    answer = model.query(HELLO, temperature=0)
    assert answer["content"] == "via litellm" and answer["cost"] == 1.0  # litellm knows no price: the table's
    assert len(server.requests) == 2  # the 429 was retried by our policy
    assert server.requests[1]["path"] == "/v1/chat/completions"
    assert server.requests[1]["headers"]["authorization"] == f"Bearer {KEY}"
    assert server.requests[1]["body"]["model"] == "arservice-test-model" and server.requests[1]["body"]["temperature"] == 0
    server.script((401, openai_error("Incorrect API key provided", code="invalid_api_key")))
    with pytest.raises(ModelError) as err:
        model.query(HELLO)
    assert err.value.status == 401 and len(server.requests) == 3


def test_litellm_missing_is_a_clear_error(tmp_path):
    # A Python that cannot import litellm: shadow it with a module that fails to import.
    (tmp_path / "litellm.py").write_text("raise ImportError('not installed')\n")
    code = ("from arservice.models import get_model, ModelError\n"
            "try:\n    get_model({'model_class': 'litellm', 'model_name': 'm'})\n"
            "except ModelError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}).stdout
    assert "litellm package is not installed: pip install 'arservice[litellm]'" in out


REAL = [("openrouter", "OPENROUTER_API_KEY", "openai/gpt-4o-mini"), ("anthropic", "ANTHROPIC_API_KEY", "claude-3-5-haiku-20241022"),
        ("openai", "OPENAI_API_KEY", "gpt-4o-mini")]


@pytest.mark.parametrize("model_class, key_env, model_name", REAL)
def test_real_provider(model_class, key_env, model_name):
    if not os.environ.get(key_env):
        pytest.skip(f"{key_env} is not set: no real {model_class} call")
    model = get_model({"model_class": model_class, "model_name": model_name, "model_kwargs": {"max_tokens": 5}})
    answer = model.query([{"role": "user", "content": "Say OK."}])
    assert answer["content"] and answer["usage"]["output_tokens"] > 0 and answer["cost"] > 0
