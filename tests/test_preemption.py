"""Preemption, resume and data-parallel training with real processes and real signals.

Each test starts real training processes (``python -m promptcam.training.launch``, the entry
point that scripts/train.py and torchrun use), waits until they have trained some steps,
signals them with os.kill (or SLURM's scancel), checks the documented exit code and the saved
mid-epoch state, resumes, and compares with an uninterrupted run. The data-parallel tests run
2 CPU processes with gloo: real torch.distributed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
from test_train import build_tiny_shards, sharpened_backbone

from promptcam.data.reader import ReplicaSlice, TrainingStream
from promptcam.training.launch import train_from_spec, train_in_processes, training_spec
from promptcam.training.metrics import METRICS_COLUMNS, read_metrics
from promptcam.training.preemption import PREEMPTED_EXIT_CODE, stop_on_signals
from promptcam.training.settings import TrainConfig
from promptcam.training.state import STATE_FORMAT

# Dropout and drop-path on: the resumed run must put every RNG back where it stood.
WITH_DROPOUT = {"layout": "scalable", "num_agnostic_prompts": 2, "prompt_dropout": 0.1}
# Off for the data-parallel comparison: each process draws its own masks (train.py docstring).
NO_DROPOUT = {**WITH_DROPOUT, "prompt_dropout": 0.0, "drop_path_rate": 0.0}
PROGRESS = re.compile(r"(\d+)/(\d+) \[")
TIMEOUT_S = 240
# A signalled run sleeps this long before each optimizer step, so that an epoch outlasts the
# time a signal takes to arrive (the launcher forwards it within 0.2 s; unthrottled, a fast
# machine trains the tiny epoch in 0.1 s and the stop lands on an epoch boundary instead).
STEP_SECONDS = 0.05
THROTTLE = f"""import time
from torch.optim.optimizer import register_optimizer_step_pre_hook
register_optimizer_step_pre_hook(lambda *_: time.sleep({STEP_SECONDS}))
"""


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a throttled process and of every process it starts: a
    ``sitecustomize`` on PYTHONPATH that registers :data:`THROTTLE`'s optimizer hook. Only the
    wall time changes: sleeping does not touch a tensor or an RNG."""
    site = tmp_path_factory.mktemp("throttle")
    (site / "sitecustomize.py").write_text(THROTTLE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    # Python only warns when a sitecustomize fails; the hook must really be there.
    check = "from torch.optim.optimizer import _global_optimizer_pre_hooks as h; assert h"
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=120)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    # 30 images per genus: 56 train images in 10 shards (9 of 6, one of 2), so that an epoch
    # has enough steps to stop inside.
    root = tmp_path_factory.mktemp("preempt")
    data = build_tiny_shards(root, per_genus=30)
    data.backbone = sharpened_backbone(root / "backbone.pt")
    return data


def config(**overrides: Any) -> TrainConfig:
    settings = dict(
        epochs=3,
        warmup_epochs=1,
        batch_size=2,
        lr=0.05,
        shuffle_buffer=50,
        num_workers=0,
        progress_seconds=0,
        device="cpu",
        threads=1,
    )
    return TrainConfig(**{**settings, **overrides})


def spec(tiny: SimpleNamespace, out_dir: Path, train_config: TrainConfig, model: dict) -> dict:
    return training_spec(
        shards_dir=tiny.shards,
        rank="genus",
        labels_tsv=tiny.labels / "genus.tsv",
        backbone=tiny.backbone,
        model_config=model,
        train_config=train_config,
        out_dir=out_dir,
    )


class TrainingProcess:
    """``python -m promptcam.training.launch SPEC`` with its stderr watched for progress."""

    def __init__(
        self,
        run_spec: dict,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.images_done = 0
        self.output: list[str] = []
        entry = command or [sys.executable, "-m", "promptcam.training.launch"]
        self.process = subprocess.Popen(
            [*entry, json.dumps(run_spec)], stderr=subprocess.PIPE, text=True, env=env
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.output.append(line)
            for done, _ in PROGRESS.findall(line.replace("\r", "\n")):
                self.images_done = max(self.images_done, int(done))

    def wait_for_images(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.images_done < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no progress to {count} images:\n{self.log()}")
            time.sleep(0.005)

    def wait(self) -> int:
        code = self.process.wait(timeout=TIMEOUT_S)
        self._reader.join(timeout=10)
        return code

    def log(self) -> str:
        return "".join(self.output)[-4000:]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    """model.pt tensors equal, bit for bit, and metrics.tsv equal except ``seconds``."""
    first, second = tensors(a / "model.pt"), tensors(b / "model.pt")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    columns = [column for column in METRICS_COLUMNS if column != "seconds"]
    pd.testing.assert_frame_equal(
        read_metrics(a / "metrics.tsv")[columns], read_metrics(b / "metrics.tsv")[columns]
    )


def saved_state(out_dir: Path) -> dict[str, Any]:
    return torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    ("stop_signal", "workers"), [(signal.SIGTERM, 0), (signal.SIGUSR1, 2)], ids=["TERM", "USR1"]
)
def test_signal_mid_epoch_saves_state_and_resume_ends_identical(
    tiny: SimpleNamespace,
    throttled: dict[str, str],
    tmp_path: Path,
    stop_signal: int,
    workers: int,
) -> None:
    train_config = config(num_workers=workers)
    uninterrupted = tmp_path / "uninterrupted"
    train_from_spec(spec(tiny, uninterrupted, train_config, WITH_DROPOUT))

    out = tmp_path / "stopped"
    run = TrainingProcess(spec(tiny, out, train_config, WITH_DROPOUT), env=throttled)
    # Inside epoch 2: a position mid-epoch, after a finished epoch's metrics row.
    run.wait_for_images(56 + 20)
    os.kill(run.process.pid, stop_signal)
    assert run.wait() == PREEMPTED_EXIT_CODE, run.log()
    assert f"stopped on {signal.Signals(stop_signal).name}" in run.log()
    assert not (out / "model.pt").exists()
    state = saved_state(out)
    assert state["format"] == STATE_FORMAT
    position = state["position"]
    assert state["epoch"] == 1, state["epoch"]
    assert position is not None and 0 < position["steps"] < 28, position
    assert len(position["processes"]) == 1
    assert set(position["processes"][0]["rng"]) == {"python", "numpy", "torch"}

    again = TrainingProcess(spec(tiny, out, train_config, WITH_DROPOUT))
    assert again.wait() == 0, again.log()
    assert f"resuming after step {position['steps']}" in "".join(again.output)
    assert not (out / "last.pt").exists()
    assert_same_run(uninterrupted, out)


def test_stop_handlers_only_note_the_signal_and_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with stop_on_signals() as request:
        assert not request
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not request and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request and request.signal_name == "SIGUSR1"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_processes_share_each_global_batch_without_overlap(tiny: SimpleNamespace) -> None:
    """The sampler rule: 2 processes' batches at each step are the halves of the one-process
    batch of twice the size, in rank order; every train image once per epoch."""

    def batches(replicas: int, replica: int) -> list[list[str]]:
        stream = TrainingStream(
            tiny.shards,
            "train",
            "genus",
            replica_slice=ReplicaSlice(12, replicas, replica),
            shuffle_buffer=50,
            seed=3,
        )
        stream.set_epoch(1)
        by_chunk: dict[int, list[str]] = {}
        for _, _, meta in stream:
            by_chunk.setdefault(meta["chunk"], []).append(meta["sample_id"])
        return [by_chunk[chunk] for chunk in sorted(by_chunk)]

    single = batches(1, 0)
    first, second = batches(2, 0), batches(2, 1)
    # 56 images: 4 global batches of 12 and one of 8, shared 6 + 6 and 4 + 4.
    assert [len(batch) for batch in single] == [12, 12, 12, 12, 8]
    assert [len(batch) for batch in first] == [len(batch) for batch in second] == [6] * 4 + [4]
    for whole, a, b in zip(single, first, second, strict=True):
        assert whole == a + b
    everything = [sample for batch in single for sample in batch]
    assert len(everything) == len(set(everything)) == 56
    # A short batch of 5 leaves one image out under 2 processes: equal shares, 2 each.
    assert ReplicaSlice(12, 2, 1).share(5) == range(2, 4)


def test_two_processes_train_what_one_trains_with_the_global_batch(
    tiny: SimpleNamespace, tmp_path: Path
) -> None:
    single = tmp_path / "single"
    train_from_spec(spec(tiny, single, config(batch_size=8), NO_DROPOUT))
    parallel = tmp_path / "parallel"
    assert train_in_processes(spec(tiny, parallel, config(batch_size=4, gpus=2), NO_DROPOUT)) == 0
    a, b = tensors(single / "model.pt"), tensors(parallel / "model.pt")
    largest = max(float((a[name] - b[name]).abs().max()) for name in a)
    print(f"2 processes vs 1, max abs difference of trainable tensors: {largest:.3g}")
    assert largest < 1e-5
    metrics_a, metrics_b = (
        read_metrics(single / "metrics.tsv"),
        read_metrics(parallel / "metrics.tsv"),
    )
    for column in ("lr", "train_loss", "train_top1", "val_loss", "val_top1"):
        assert metrics_a[column].tolist() == pytest.approx(metrics_b[column].tolist(), abs=1e-5)
    # Another seed lands far outside that tolerance: the comparison can fail.
    other = tmp_path / "other"
    train_from_spec(spec(tiny, other, config(batch_size=8, seed=1), NO_DROPOUT))
    c = tensors(other / "model.pt")
    assert max(float((a[name] - c[name]).abs().max()) for name in a) > 1e-3


def test_two_processes_stop_together_and_resume_identically(
    tiny: SimpleNamespace, throttled: dict[str, str], tmp_path: Path
) -> None:
    train_config = config(batch_size=2, gpus=2)
    uninterrupted = tmp_path / "uninterrupted"
    assert train_in_processes(spec(tiny, uninterrupted, train_config, WITH_DROPOUT)) == 0

    out = tmp_path / "stopped"
    run_spec = spec(tiny, out, train_config, WITH_DROPOUT)
    # The launcher that scripts/train.py runs, in a process of its own to be signalled.
    launcher = [
        sys.executable,
        "-c",
        "import json, sys; from promptcam.training.launch import train_in_processes; "
        "sys.exit(train_in_processes(json.loads(sys.argv[1])))",
    ]
    watcher = TrainingProcess(run_spec, command=launcher, env=throttled)
    watcher.wait_for_images(56 + 8)
    os.kill(watcher.process.pid, signal.SIGTERM)  # the launcher only: it passes the signal on
    assert watcher.wait() == PREEMPTED_EXIT_CODE, watcher.log()
    position = saved_state(out)["position"]
    assert position is not None and len(position["processes"]) == 2
    assert train_in_processes(run_spec) == 0
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_slurm_signal_then_retry_resumes_to_the_same_model(
    slurm_cluster, tiny: SimpleNamespace, throttled: dict[str, str], tmp_path: Path
) -> None:
    """A batch job that retries on exit 75, as a requeue or Snakemake's retry would; the
    signal comes from SLURM (scancel --signal to the job's steps)."""
    train_config = config(num_workers=1)
    uninterrupted = tmp_path / "uninterrupted"
    train_from_spec(spec(tiny, uninterrupted, train_config, WITH_DROPOUT))

    out = tmp_path / "slurm"
    (tmp_path / "spec.json").write_text(json.dumps(spec(tiny, out, train_config, WITH_DROPOUT)))
    attempts = tmp_path / "attempts.txt"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/sh\n"
        "for attempt in 1 2 3; do\n"
        f'  srun -n1 {sys.executable} -m promptcam.training.launch "$(cat {tmp_path}/spec.json)"\n'
        "  code=$?\n"
        f'  echo "$attempt $code" >> {attempts}\n'
        f"  [ $code -eq {PREEMPTED_EXIT_CODE} ] || exit $code\n"
        "done\n"
    )
    output = tmp_path / "job.out"
    env = {k: v for k, v in throttled.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    job = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster.partition, "-c", "2", "-o", str(output),
         str(script)],
        capture_output=True, text=True, timeout=30, check=True, env=env,
    ).stdout.strip().split(";")[0]  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            text = output.read_text(errors="replace") if output.exists() else ""
            done = [int(d) for d, _ in PROGRESS.findall(text.replace("\r", "\n"))]
            if done and max(done) >= 80:
                break
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.01)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        while subprocess.run(
            ["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30
        ).stdout.strip():
            assert time.monotonic() < deadline, output.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    text = output.read_text(errors="replace")
    assert attempts.read_text().split("\n")[:2] == [f"1 {PREEMPTED_EXIT_CODE}", "2 0"], text[-3000:]
    assert "stopped on SIGUSR1" in text and "resuming after step" in text
    assert_same_run(uninterrupted, out)
    shutil.rmtree(out)
