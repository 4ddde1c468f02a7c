"""Runners by the name given to `arservice --runner`."""

from .local import LocalRunner

RUNNERS = {
    "local": LocalRunner,
}
