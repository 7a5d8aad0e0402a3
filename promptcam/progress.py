"""Compact progress lines of long jobs (an epoch, a share of the images), at a modest rate.

The library reports through the ``promptcam.progress`` logger. In a Snakemake job,
:func:`promptcam.joblog.job_log` sends those records to the console as well as to the job's
log (which also holds the detail: progress bars, every epoch's metrics); elsewhere they go
wherever the caller's logging sends INFO records.
"""

from __future__ import annotations

import logging
import math
import time

PROGRESS_LOGGER = "promptcam.progress"

# Seconds between two progress lines of jobs that have no setting for it.
DEFAULT_SECONDS = 10.0

_LOGGER = logging.getLogger(PROGRESS_LOGGER)


class ProgressLines:
    """Reports a line when ``seconds`` have passed since the last one (or when forced: the
    first and the last line of a job say what it does and what it wrote).

    Args:
        seconds: Least time between two lines (0: every line).
    """

    def __init__(self, seconds: float = DEFAULT_SECONDS) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self._last = -math.inf

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def report(self, message: str, *args: object, force: bool = False) -> bool:
        """Log ``message % args`` if a line is due (or ``force``d); True when it was logged."""
        now = time.perf_counter()
        if not force and now - self._last < self.seconds:
            return False
        self._last = now
        _LOGGER.info(message, *args)
        return True
