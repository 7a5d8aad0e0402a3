"""Logging of one Snakemake job: everything it says, and why it failed, goes to its log file."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def job_log(path: str | os.PathLike, task: str) -> Iterator[logging.Logger]:
    """Send logging, warnings and progress bars (stderr) to ``path``; log a failure there.

    Without this the log would hold nothing when a job fails: the traceback would reach only
    the terminal (or a cluster's job output) of whoever started the workflow.
    """
    with open(path, "a") as handle, contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, format=LOG_FORMAT, force=True)
        try:
            yield logging.getLogger(task)
        except Exception:
            logging.exception("%s failed", task)
            raise
