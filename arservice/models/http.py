"""POST JSON to a provider with the standard library: timeouts, retries with backoff, clear errors.

Retried: 408, 429, 5xx (and Anthropic's 529), connection errors and timeouts. Not retried: every
other status (400 bad request or context too long, 401/403 auth, 404 unknown model), because
asking again gives the same answer. A `Retry-After` header, when the provider sends one, sets
the wait (capped). Headers are never logged: they carry the API key.
"""

import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from ..logs import EventLog

log = EventLog("models")


class ModelError(RuntimeError):
    """A provider call that failed: names the provider, the HTTP status (None if no answer) and why."""

    def __init__(self, provider: str, status: int | None, message: str, retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        self.provider, self.status, self.message = provider, status, message
        self.retryable, self.retry_after_s = retryable, retry_after_s
        super().__init__(f"{provider}: {'HTTP ' + str(status) if status else 'no answer'}: {message}")


def is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def error_message(body: bytes) -> str:
    """The provider's own words from an error body (OpenAI and Anthropic both use {"error": {"message"}})."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        return f"{kind}: {error.get('message')}" if kind else str(error.get("message"))
    return str(error)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    try:
        return max(float(headers.get("Retry-After")), 0.0)  # type: ignore[arg-type]  # None: the TypeError below
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: fall back to our own backoff


def with_retries(provider: str, attempt_once: Callable[[], Any], max_retries: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0) -> Any:
    """Call `attempt_once()` until it returns, retrying the ModelErrors marked retryable."""
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, not {max_retries}")
    for attempt in range(max_retries + 1):
        try:
            return attempt_once()
        except ModelError as error:
            if not error.retryable or attempt == max_retries:
                raise
            wait = error.retry_after_s
            if wait is None:
                # Exponential backoff with jitter, so clients throttled together do not retry together.
                wait = backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            wait = min(wait, max_backoff_s)
            log.warning("retry", provider=provider, attempt=attempt + 1, status=error.status, wait_s=round(wait, 3),
                        reason=error.message[:200])
            time.sleep(wait)


def post_json(provider: str, url: str, headers: dict[str, str], body: dict[str, Any], timeout: float,
              max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 60.0) -> Any:
    """POST `body` as JSON and return the decoded JSON answer; raise ModelError when it fails for good."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})

    def attempt_once():
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ModelError(provider, exc.code, error_message(exc.read()), retryable=is_retryable(exc.code),
                             retry_after_s=retry_after_s(exc.headers)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                reason = f"timed out after {timeout:g} s"
            raise ModelError(provider, None, f"{url}: {reason}", retryable=True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ModelError(provider, response.status, f"answer is not JSON: {raw[:200]!r}") from None

    return with_retries(provider, attempt_once, max_retries, backoff_s, max_backoff_s)
