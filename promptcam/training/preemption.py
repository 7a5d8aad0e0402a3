"""Stopping a training run early on request (cluster preemption, a time limit), resumably.

SLURM sends SIGTERM when it ends a job (at its time limit or when preempting it, then SIGKILL
after the cluster's KillWait) and, when asked (``sbatch --signal=TERM@120`` or ``USR1@...``),
a signal some time before the limit. Training catches SIGTERM and SIGUSR1: the handler only
notes the signal; the training loop looks at the note after every optimizer step, writes a
resumable ``last.pt`` there and raises :class:`TrainingPreempted`. The training entry points
then exit with :data:`PREEMPTED_EXIT_CODE`, so that a retry (Snakemake's ``retries``, a
requeue) continues from that step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": the run
# wrote its state and stopped on request. Not a code Python or a signal death ever gives.
PREEMPTED_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(Exception):
    """Training stopped on a signal after saving its state at ``state_path``."""

    def __init__(self, state_path: Path, signal_name: str) -> None:
        super().__init__(f"stopped on {signal_name}; resumable state in {state_path}")
        self.state_path = state_path
        self.signal_name = signal_name


class StopRequest:
    """Which stop signal arrived, if any; set by the handlers of :func:`stop_on_signals`."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __bool__(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return (
            "no signal" if self.signal_number is None else signal.Signals(self.signal_number).name
        )

    def _note(self, signal_number: int, _frame: FrameType | None) -> None:
        # Only a note: the loop does the saving at a step boundary, outside the handler.
        self.signal_number = signal_number


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Note SIGTERM and SIGUSR1 instead of dying, inside the block; the previous handlers
    come back after it. Outside the main thread (where Python refuses handlers) nothing is
    installed and the request never fires."""
    request = StopRequest()
    previous = {}
    try:
        for number in STOP_SIGNALS:
            previous[number] = signal.signal(number, request._note)
    except ValueError:  # not the main thread
        pass
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_status(work: Callable[..., object], /, *args: object, **kwargs: object) -> int:
    """``work(*args, **kwargs)``'s exit status for an entry point: 0 when it returns,
    :data:`PREEMPTED_EXIT_CODE` when it stopped on a signal (:class:`TrainingPreempted`,
    logged: its state is saved for the retry)."""
    try:
        work(*args, **kwargs)
    except TrainingPreempted as stopped:
        logging.getLogger(__name__).warning("%s; exit %d", stopped, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    return 0
