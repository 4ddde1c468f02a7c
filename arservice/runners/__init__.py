"""Runners by the name given to `arservice --runner`."""

from .base import BaseRunner
from .local import LocalRunner
from .slurm import SlurmRunner

RUNNERS: dict[str, type[BaseRunner]] = {
    "local": LocalRunner,
    "slurm": SlurmRunner,
}
