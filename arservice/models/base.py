"""The one small model interface: `query(messages, **kwargs)` and running totals.

`messages` are OpenAI-style `{"role", "content"}` dicts. `query` answers
`{"content", "usage", "cost", "model", "finish_reason", "response"}`: `usage` has
`input_tokens` (every prompt token), `output_tokens`, `cached_tokens` (read from the provider's
cache) and `cache_write_tokens`; `response` is the provider's answer as it came (tool calls, ...).
Each model keeps its own totals (with optional `cost_limit` / `call_limit`) and adds to the
tracker shared by the process (`cost.GLOBAL`, limits from ARSERVICE_MODEL_COST_LIMIT and
ARSERVICE_MODEL_CALL_LIMIT) and to an optional `tracker` of the caller's.
"""

import os
from collections.abc import Callable
from typing import Any

from .cost import GLOBAL, CostTracker, PriceTable
from .http import ModelError, post_json, with_retries


class Model:
    provider: str = None  # type: ignore[assignment]  # each class sets it; the name in errors and the registry
    key_env: str | None = None  # where the API key comes from when the config has none
    reports_cost = False  # whether the provider puts the cost of a call in its answer

    def __init__(self, model_name: str, model_kwargs: dict[str, Any] | None = None, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 120.0, max_retries: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, prices: PriceTable | dict[str, dict[str, float]] | None = None,
                 cost_tracking: str = "strict", tracker: CostTracker | None = None, cost_limit: float | None = None,
                 call_limit: int | None = None) -> None:
        if cost_tracking not in ("strict", "ignore"):
            raise ValueError("cost_tracking is 'strict' (unknown cost is an error) or 'ignore'")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self._api_key = api_key or (os.environ.get(self.key_env) if self.key_env else None)
        self.base_url = (base_url or self.default_base_url()).rstrip("/")
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.cost_tracking = cost_tracking
        self.totals = CostTracker(cost_limit, call_limit)
        self.trackers = [t for t in (self.totals, GLOBAL, tracker) if t is not None]
        if cost_tracking == "strict" and not self.reports_cost and model_name not in self.prices:
            raise ValueError(f"no price for {model_name!r}: add it to a prices JSON file (ARSERVICE_MODEL_PRICES) or "
                             "set cost_tracking='ignore'")

    def default_base_url(self) -> str:
        return ""

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(model_name={self.model_name!r}, base_url={self.base_url!r})"

    def query(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        for tracker in self.trackers:
            tracker.begin_call()
        result = self._query(messages, {**self.model_kwargs, **kwargs})
        usage = result["usage"]
        cost = result.pop("reported_cost", None)
        if cost is None and self.model_name in self.prices:
            cost = self.prices.cost(self.model_name, usage)
        if cost is None:
            if self.cost_tracking == "strict":
                raise ModelError(self.provider, None, f"the provider reported no cost for {self.model_name!r} and no price "
                                 "is known: add one (ARSERVICE_MODEL_PRICES) or set cost_tracking='ignore'")
            cost = 0.0
        for tracker in self.trackers:
            tracker.add(cost, usage)
        return {**result, "cost": cost, "model": self.model_name}

    def _query(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call the provider; return {content, usage, finish_reason, response[, reported_cost]}."""
        raise NotImplementedError

    def _post(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Any:
        return post_json(self.provider, self.base_url + path, headers, body, self.timeout,
                         self.max_retries, self.backoff_s, self.max_backoff_s)

    def _retrying(self, attempt_once: Callable[[], Any]) -> Any:
        return with_retries(self.provider, attempt_once, self.max_retries, self.backoff_s, self.max_backoff_s)

    def _require_key(self) -> str:
        if not self._api_key:
            raise ModelError(self.provider, None, f"no API key: set {self.key_env} or pass api_key")
        return self._api_key
