"""Runners by the name given to `arservice --runner`."""

from .local import LocalRunner
from .slurm import SlurmRunner

RUNNERS = {
    "local": LocalRunner,
    "slurm": SlurmRunner,
}
