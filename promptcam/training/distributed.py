"""Data-parallel training of one rank on several processes (one per GPU, or CPU processes).

Processes find each other through torchrun's environment contract (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): :func:`run_processes` starts them that way
on one machine, and ``torchrun --nproc-per-node N -m promptcam.training.launch SPEC`` works
too. CUDA processes talk NCCL, CPU processes gloo; small control messages (the stop request,
per-process resume state) always go through a gloo group on the CPU, so that reading them
never waits on a GPU's queue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
import torch.distributed as dist

from promptcam.training.preemption import PREEMPTED_EXIT_CODE, stop_on_signals


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes; ``control`` is the gloo group of
    :func:`any_process`, :func:`gather` and :func:`barrier` (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def is_main(self) -> bool:
        """The process that validates and writes every file."""
        return self.rank == 0


def current_processes(control: Any = None) -> Processes:
    """The initialised process group's view of this process, or a lone process."""
    if not dist.is_available() or not dist.is_initialized():
        return Processes()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, control)


@contextlib.contextmanager
def process_group(use_cuda: bool) -> Iterator[Processes]:
    """Join the process group that the environment describes (a lone process when
    ``WORLD_SIZE`` is unset or 1); leave it afterwards."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Processes()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    try:
        control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
        yield current_processes(control)
    finally:
        dist.destroy_process_group()


def any_process(processes: Processes, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call this together)."""
    if processes.world_size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=processes.control)
    return bool(value.item())


def gather(processes: Processes, value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    if processes.world_size == 1:
        return [value]
    values: list[Any] = [None] * processes.world_size
    dist.all_gather_object(values, value, group=processes.control)
    return values


def barrier(processes: Processes) -> None:
    if processes.world_size > 1:
        dist.barrier(group=processes.control)


def sum_over_processes(processes: Processes, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes (every process must call this together)."""
    if processes.world_size == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def combined_exit_code(codes: Sequence[int]) -> int:
    """One code for the processes' exit codes: 0 if all succeeded; the preemption code if
    every failure was a preemption (the run is resumable); else the first other failure."""
    failures = [code for code in codes if code != 0]
    if not failures:
        return 0
    others = [code for code in failures if code != PREEMPTED_EXIT_CODE]
    return others[0] if others else PREEMPTED_EXIT_CODE


def run_processes(
    count: int,
    argv: Sequence[str],
    output: IO[str] | None = None,
    poll_seconds: float = 0.2,
    grace_seconds: float = 30.0,
) -> int:
    """Run ``python argv...`` as ``count`` processes of one group on this machine (torchrun's
    environment, rendezvous on a free local port) and return :func:`combined_exit_code`;
    ``output``: where their stdout and stderr go (default: this process's).

    A SIGTERM or SIGUSR1 sent to this launcher is passed on to every process (a cluster may
    signal the launcher only), which then stop together at a step boundary. When one process
    fails otherwise, the others would wait for it in their next collective: they get SIGTERM,
    and SIGKILL ``grace_seconds`` later.
    """
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["WORLD_SIZE"] = str(count)
    children = []
    with stop_on_signals() as request:
        for rank in range(count):
            child_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            children.append(
                subprocess.Popen(
                    [sys.executable, *argv], env=child_env, stdout=output, stderr=output
                )
            )
        forwarded = False
        kill_at = None
        while any(child.poll() is None for child in children):
            if request and not forwarded:
                _signal_all(children, request.signal_number)
                forwarded = True
            failed = [c.returncode for c in children if c.returncode not in (None, 0)]
            if kill_at is None and any(code != PREEMPTED_EXIT_CODE for code in failed):
                _signal_all(children, signal.SIGTERM)
                kill_at = time.monotonic() + grace_seconds
            if kill_at is not None and time.monotonic() > kill_at:
                _signal_all(children, signal.SIGKILL)
            time.sleep(poll_seconds)
    return combined_exit_code([_exit_code(child.returncode) for child in children])


def _exit_code(returncode: int) -> int:
    # Popen gives -N for a death by signal N; a shell would report 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _signal_all(children: Sequence[subprocess.Popen], signal_number: int | None) -> None:
    for child in children:
        if child.poll() is None and signal_number is not None:
            child.send_signal(signal_number)
