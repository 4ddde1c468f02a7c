"""What model calls cost: a price table, and thread-safe running totals with optional limits.

Prices are US dollars per million tokens: `input`, `output`, `cached_input` (prompt tokens read
from a provider's cache) and `cache_write` (prompt tokens written to it, Anthropic). A provider
that reports the cost itself (OpenRouter) is believed; for the others the table is used. Users
extend or override the table from a JSON file of the same shape: `{"model": {"input": 3, ...}}`.
"""

import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

# As the providers published them in 2025; override from JSON when they change.
DEFAULT_PRICES = {
    "gpt-4o": {"input": 2.5, "output": 10.0, "cached_input": 1.25},
    "gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075},
    "claude-3-5-haiku-20241022": {"input": 0.8, "output": 4.0, "cached_input": 0.08, "cache_write": 1.0},
    "claude-3-7-sonnet-20250219": {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75},
    "claude-sonnet-4-20250514": {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75},
    "claude-opus-4-20250514": {"input": 15.0, "output": 75.0, "cached_input": 1.5, "cache_write": 18.75},
}
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write")


class CostLimitExceeded(RuntimeError):
    pass


class PriceTable:
    def __init__(self, prices: dict[str, dict[str, float]] | None = None) -> None:
        self.prices: dict[str, dict[str, float]] = {}
        self.update(DEFAULT_PRICES)
        self.update(prices or {})
        path = os.environ.get("ARSERVICE_MODEL_PRICES")
        if path:
            self.load(path)

    def update(self, prices: dict[str, Any]) -> None:
        for model, price in prices.items():
            if not isinstance(price, dict) or not set(price) <= set(PRICE_FIELDS) or not {"input", "output"} <= set(price) \
                    or not all(isinstance(v, (int, float)) and v >= 0 for v in price.values()):
                raise ValueError(f"price of {model!r} must be {{'input': $, 'output': $[, 'cached_input', 'cache_write']}}"
                                 f" per million tokens, not {price!r}")
            self.prices[model] = dict(price)

    def load(self, path: str) -> None:
        try:
            with open(path) as f:
                prices = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read prices from {path}: {exc}") from None
        if not isinstance(prices, dict):
            raise ValueError(f"{path}: prices must be a JSON object of model -> price")
        self.update(prices)

    def __contains__(self, model: object) -> bool:
        return model in self.prices

    def cost(self, model: str, usage: dict[str, int]) -> float:
        """Dollars for `usage` (input_tokens counts every prompt token, cached ones included)."""
        price = self.prices[model]
        cached = usage.get("cached_tokens", 0)
        written = usage.get("cache_write_tokens", 0)
        uncached = max(usage.get("input_tokens", 0) - cached - written, 0)
        return (uncached * price["input"]
                + cached * price.get("cached_input", price["input"])
                + written * price.get("cache_write", price["input"])
                + usage.get("output_tokens", 0) * price["output"]) / 1e6


_N = TypeVar("_N", int, float)


def _limit_from_env(name: str, kind: Callable[[str], _N]) -> _N | None:
    value = os.environ.get(name)
    return kind(value) if value else None


class CostTracker:
    """Calls, tokens and dollars so far. `begin_call` checks the limits and counts the call in one
    step under the lock, so N threads racing against a call limit of K make exactly K calls."""

    def __init__(self, cost_limit: float | None = None, call_limit: int | None = None) -> None:
        self._lock = threading.Lock()
        self.cost_limit, self.call_limit = cost_limit, call_limit
        self.calls = 0
        self.cost = 0.0
        self.input_tokens = self.output_tokens = self.cached_tokens = 0

    def begin_call(self) -> None:
        with self._lock:
            if self.call_limit is not None and self.calls >= self.call_limit:
                raise CostLimitExceeded(f"model call limit reached: {self.calls} of {self.call_limit} calls made")
            if self.cost_limit is not None and self.cost >= self.cost_limit:
                raise CostLimitExceeded(f"model cost limit reached: ${self.cost:.4f} spent of ${self.cost_limit:g}")
            self.calls += 1

    def add(self, cost: float, usage: dict[str, int]) -> None:
        with self._lock:
            self.cost += cost
            self.input_tokens += usage.get("input_tokens", 0)
            self.output_tokens += usage.get("output_tokens", 0)
            self.cached_tokens += usage.get("cached_tokens", 0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "cost": self.cost, "input_tokens": self.input_tokens,
                    "output_tokens": self.output_tokens, "cached_tokens": self.cached_tokens,
                    "cost_limit": self.cost_limit, "call_limit": self.call_limit}


# Every model adds to this one too, so a process has one total however many models it uses.
GLOBAL = CostTracker(_limit_from_env("ARSERVICE_MODEL_COST_LIMIT", float), _limit_from_env("ARSERVICE_MODEL_CALL_LIMIT", int))
