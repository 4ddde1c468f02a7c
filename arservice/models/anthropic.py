"""Anthropic Messages API (`POST {base_url}/v1/messages`), with prompt caching as an option.

OpenAI-style messages are translated: system messages become the `system` field. With
`prompt_caching=True` the system prompt and the last two user messages carry
`cache_control: {"type": "ephemeral"}`, so each call reads the conversation so far from the
cache and writes the newest turn to it (the pattern Anthropic documents for multi-turn agents;
at most 4 markers are allowed, this uses 3).
"""

from typing import Any

from .base import Model
from .http import ModelError

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
CACHED_USER_TURNS = 2


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]


def _mark(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return blocks


class AnthropicModel(Model):
    provider = "anthropic"
    key_env = "ANTHROPIC_API_KEY"

    def __init__(self, model_name: str, prompt_caching: bool = False, **kwargs: Any) -> None:
        super().__init__(model_name, **kwargs)
        self.prompt_caching = prompt_caching

    def default_base_url(self) -> str:
        return "https://api.anthropic.com"

    def request_body(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
        system = [b for m in messages if m["role"] == "system" for b in _blocks(m["content"])]
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        if self.prompt_caching:
            if system:
                system = _mark(system)
            users = [t for t in turns if t["role"] == "user"][-CACHED_USER_TURNS:]
            for turn in users:
                turn["content"] = _mark(_blocks(turn["content"]))
        body = {"model": self.model_name, "max_tokens": DEFAULT_MAX_TOKENS, "messages": turns, **kwargs}
        if system:
            body["system"] = system
        return body

    def _query(self, messages, kwargs):
        headers = {"x-api-key": self._require_key(), "anthropic-version": API_VERSION}
        answer = self._post("/v1/messages", headers, self.request_body(messages, kwargs))
        try:
            usage = answer.get("usage") or {}
            cached = usage.get("cache_read_input_tokens") or 0
            written = usage.get("cache_creation_input_tokens") or 0
            return {
                "content": "".join(b["text"] for b in answer["content"] if b.get("type") == "text"),
                "finish_reason": answer.get("stop_reason"),
                # Anthropic's input_tokens leaves out cache reads and writes; ours counts every prompt token.
                "usage": {"input_tokens": usage.get("input_tokens", 0) + cached + written,
                          "output_tokens": usage.get("output_tokens", 0),
                          "cached_tokens": cached, "cache_write_tokens": written},
                "response": answer,
            }
        except (KeyError, TypeError, AttributeError):
            raise ModelError(self.provider, None, f"answer has no content blocks: {str(answer)[:300]}") from None
