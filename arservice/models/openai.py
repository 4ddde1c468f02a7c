"""OpenAI-compatible chat completions (`POST {base_url}/chat/completions`).

One client for OpenAI, vLLM, SGLang and litellm's proxy (by `base_url`), and OpenRouter, whose
answers carry the call's cost in `usage.cost`.
"""

from typing import Any

from .base import Model
from .http import ModelError, is_retryable


class OpenAIModel(Model):
    provider = "openai"
    key_env = "OPENAI_API_KEY"

    def default_base_url(self) -> str:
        return "https://api.openai.com/v1"

    def request_body(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model_name, "messages": messages, **kwargs}

    def _query(self, messages, kwargs):
        # A key is optional here: local servers (vLLM, SGLang) often take none.
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        answer = self._post("/chat/completions", headers, self.request_body(messages, kwargs))
        if "error" in answer:  # OpenRouter reports some upstream failures inside a 200
            error = answer["error"] if isinstance(answer["error"], dict) else {"message": answer["error"]}
            status = error.get("code") if isinstance(error.get("code"), int) else None
            raise ModelError(self.provider, status, str(error.get("message")), retryable=bool(status and is_retryable(status)))
        try:
            choice = answer["choices"][0]
            usage = answer.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            result = {
                "content": choice["message"].get("content") or "",
                "finish_reason": choice.get("finish_reason"),
                "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0),
                          "cached_tokens": details.get("cached_tokens") or 0, "cache_write_tokens": 0},
                "response": answer,
            }
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ModelError(self.provider, None, f"answer has no choices[0].message: {str(answer)[:300]}") from None
        if self.reports_cost:
            result["reported_cost"] = usage.get("cost")
        return result


class OpenRouterModel(OpenAIModel):
    provider = "openrouter"
    key_env = "OPENROUTER_API_KEY"
    reports_cost = True

    def default_base_url(self) -> str:
        return "https://openrouter.ai/api/v1"

    def request_body(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
        # Ask for usage accounting, so the answer's usage carries the cost.
        return {**super().request_body(messages, kwargs), "usage": {"include": True}}

    def _query(self, messages, kwargs):
        self._require_key()
        return super()._query(messages, kwargs)
