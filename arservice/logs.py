"""Greppable logs: `<time> <LEVEL> <component> <event> key=value ...`, one line per event."""

import logging
import sys
from typing import Any


class EventLog:
    def __init__(self, component: str) -> None:
        self._logger = logging.getLogger(f"arservice.{component}")

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            pairs = " ".join(f"{k}={_value(v)}" for k, v in fields.items())
            self._logger.log(level, f"{event} {pairs}" if pairs else event)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def _value(v: object) -> str:
    text = str(v)
    return repr(text) if (not text or any(c.isspace() or c in "'\"=" for c in text)) else text


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
