"""Logging of one Snakemake job: everything it says, and why it failed, goes to its log file;
its progress lines (promptcam.progress) also go to the console."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from promptcam.progress import PROGRESS_LOGGER

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def job_log(path: str | os.PathLike, task: str) -> Iterator[logging.Logger]:
    """Send logging, warnings and progress bars (stderr) to ``path``; log a failure there.

    Without this the log would hold nothing when a job fails: the traceback would reach only
    the terminal (or a cluster's job output) of whoever started the workflow. Lines of the
    ``promptcam.progress`` logger also reach the console (the process's own stderr, which
    Snakemake shows), prefixed ``[task]``, e.g. ``[train family] epoch 3/20 ...``, so a long
    run is not silent.
    """
    console = _console_handler(task)
    progress = logging.getLogger(PROGRESS_LOGGER)
    with open(path, "a") as handle, contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, format=LOG_FORMAT, force=True)
        if console is not None:
            progress.addHandler(console)
        try:
            yield logging.getLogger(task)
        except Exception:
            logging.exception("%s failed", task)
            raise
        finally:
            if console is not None:
                progress.removeHandler(console)


def _console_handler(task: str) -> logging.Handler | None:
    # sys.__stderr__, not sys.stderr: the latter is the log file inside job_log.
    if sys.__stderr__ is None:
        return None
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter(f"[{task}] %(message)s"))
    handler.setLevel(logging.INFO)
    return handler
