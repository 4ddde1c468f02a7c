"""Any provider litellm knows (`pip install arservice[litellm]`), imported only when used.

litellm's own retries are off (num_retries=0): its errors are mapped to ModelError and retried
by the same policy as the other clients. Its cost calculator is used when it knows the model;
otherwise our price table.
"""

from typing import Any

from .base import Model
from .http import ModelError, is_retryable


class LitellmModel(Model):
    provider = "litellm"
    reports_cost = True  # litellm computes it for the models in its own price map

    def __init__(self, model_name: str, **kwargs: Any) -> None:
        try:
            import litellm
        except ImportError:
            raise ModelError("litellm", None, "the litellm package is not installed: pip install 'arservice[litellm]'") from None
        self._litellm = litellm
        super().__init__(model_name, **kwargs)

    def _query(self, messages, kwargs):
        litellm = self._litellm
        options = {"api_key": self._api_key, "api_base": self.base_url or None, "timeout": self.timeout}

        def attempt_once():
            try:
                return litellm.completion(model=self.model_name, messages=messages, num_retries=0,
                                          **{k: v for k, v in options.items() if v is not None}, **kwargs)
            except litellm.exceptions.APIConnectionError as exc:
                raise ModelError(self.provider, None, str(exc), retryable=True) from None
            except Exception as exc:  # litellm maps every provider failure to an exception with status_code
                status = getattr(exc, "status_code", None)
                raise ModelError(self.provider, status, f"{type(exc).__name__}: {exc}",
                                 retryable=isinstance(status, int) and is_retryable(status)) from None

        response = self._retrying(attempt_once)
        usage = getattr(response, "usage", None)
        details = getattr(usage, "prompt_tokens_details", None)
        try:
            cost = litellm.completion_cost(completion_response=response)
        except Exception:  # a model litellm has no price for: fall back to our table
            cost = None
        choice = response.choices[0]
        return {
            "content": choice.message.content or "",
            "finish_reason": choice.finish_reason,
            "usage": {"input_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                      "output_tokens": getattr(usage, "completion_tokens", 0) or 0,
                      "cached_tokens": getattr(details, "cached_tokens", 0) or 0, "cache_write_tokens": 0},
            "response": response.model_dump() if hasattr(response, "model_dump") else response,
            "reported_cost": cost,
        }
