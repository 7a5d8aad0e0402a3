"""End-to-end on SLURM: the tiny pipeline's data stage, then one rank's train and evaluate,
submitted through the user profile (slurm/config.yaml) plus the test cluster's overrides
(slurm/local/config.yaml) to the real local cluster, each job asking for its measured memory
and time (promptcam.resources)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from promptcam.config import merged, rank_train_settings, validate_config
from promptcam.resources import JobSize, job_resources, read_split_counts

TIMEOUT_S = 900


def run_log(proc: subprocess.CompletedProcess | None, workdir: Path) -> str:
    parts = [] if proc is None else [proc.stdout[-4000:], proc.stderr[-6000:]]
    for folder in (workdir / ".snakemake" / "slurm_logs", workdir / "logs"):
        for log in sorted(folder.rglob("*.log")):
            parts.append(
                f"--- {log.relative_to(workdir)}\n{log.read_text(errors='replace')[-3000:]}"
            )
    return "\n".join(parts)


def slurm_job_ids(workdir: Path, rule: str) -> list[str]:
    """Job ids of a rule's SLURM jobs, from the plugin's per-job logs (<jobid>.log)."""
    logs = (workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log")
    return sorted((path.stem for path in logs), key=int)


def memory_mb(shown: str) -> int:
    """A job's memory request from `scontrol -o show job` (MinMemoryNode=3G, 2304M, ...)."""
    value, unit = re.search(r"MinMemoryNode=(\d+)([MGT])", shown).groups()
    return int(value) * {"M": 1, "G": 1024, "T": 1024**2}[unit]


def genus_size(workdir: Path, configfile: Path, repo_root: Path) -> JobSize:
    """What genus's train job is sized by: its label map's counts and its epochs."""
    classes, train, val, test = read_split_counts(workdir / "results/data/labels/genus.tsv")
    config = merged(
        yaml.safe_load((repo_root / "config" / "config.yaml").read_text()),
        yaml.safe_load(configfile.read_text()),
    )
    validate_config(config, repo_root / "workflow" / "schemas" / "config.schema.yaml")
    epochs = rank_train_settings(config["train"], "genus", config["levels"])["epochs"]
    return JobSize(train + val + test, train, val, test, classes, epochs)


@pytest.mark.slow
def test_one_rank_trains_and_evaluates_through_slurm(
    slurm_cluster, repo_root, tmp_path, run_command
):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_PROFILE")}
    env.pop("SLURM_JOB_ID", None)
    configfile = repo_root / "tests" / "configs" / "pipeline_tiny.yaml"
    # Target first: --config and --configfile take several values each. gpus_per_job=1: the
    # GPU rules ask the cluster for its (fake, counted) GPU, as on a real cluster; the tiny
    # config still trains on the CPU.
    cmd = [sys.executable, "-m", "snakemake", "results/genus/eval.json", "--cores", "2",
           "--profile", str(repo_root / "slurm"), "--profile", str(repo_root / "slurm" / "local"),
           "--snakefile", str(repo_root / "Snakefile"),
           "--directory", str(workdir), "--slurm-keep-successful-logs",
           "--config", "gpus_per_job=1",
           "--configfile", str(configfile)]  # fmt: skip
    try:
        proc = run_command(cmd, timeout=TIMEOUT_S, cwd=workdir, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"snakemake ran past {TIMEOUT_S} s:\n{(exc.stderr or '')[-6000:]}\n"
            f"{run_log(None, workdir)}"
        )
    assert proc.returncode == 0, f"snakemake failed:\n{run_log(proc, workdir)}"

    evaluation = json.loads((workdir / "results" / "genus" / "eval.json").read_text())
    assert evaluation["rank"] == "genus"
    assert 0.0 <= evaluation["top1"] <= 1.0
    assert (workdir / "results" / "genus" / "model.pt").stat().st_size > 0
    # Only the target's rank ran.
    assert not (workdir / "results" / "family").exists()
    assert not (workdir / "results" / "species").exists()

    # Every job went through SLURM: one sbatch job per rule, each with its log (kept by
    # --slurm-keep-successful-logs; the plugin deletes them by default).
    for rule in ("generate_demo", "prepare_metadata", "write_shards", "train", "evaluate"):
        assert len(slurm_job_ids(workdir, rule)) == 1, (rule, run_log(proc, workdir))
    train_job = slurm_job_ids(workdir, "train")[0]
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", train_job], capture_output=True, text=True, timeout=30
    ).stdout
    # Completed jobs stay visible for MinJobAge (300 s); the train job ended well within that.
    assert "JobState=COMPLETED" in shown, shown
    assert f"Partition={slurm_cluster.partition} " in shown, shown
    assert "gres:gpu:1" in shown or "gres/gpu:1" in shown, shown
    # The train job asked for what promptcam.resources says genus needs, from its label map.
    size = genus_size(workdir, configfile, repo_root)
    train, val, test = size.train, size.val, size.test
    request = job_resources("train", size)
    hours, minutes = divmod(request.runtime, 60)
    assert f"TimeLimit={hours:02d}:{minutes:02d}:00 " in shown, (request, shown)
    assert memory_mb(shown) == request.mem_mb, (request, shown)
    # A CPU rule: no GPU, its own measured request, the CPU partition.
    data_job = slurm_job_ids(workdir, "write_shards")[0]
    data = subprocess.run(
        ["scontrol", "-o", "show", "job", data_job], capture_output=True, text=True, timeout=30
    ).stdout
    data_request = job_resources("write_shards", JobSize(images=train + val + test))
    assert memory_mb(data) == data_request.mem_mb, (data_request, data)
    assert "gres:gpu" not in data and "gres/gpu" not in data, data


def throttled_pythonpath(folder: Path, step_seconds: float, pythonpath: str | None) -> str:
    """PYTHONPATH whose sitecustomize makes every optimizer step sleep ``step_seconds``: it
    stretches a training's wall time only (no tensor, no RNG changes)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import time\n"
        "from torch.optim.optimizer import register_optimizer_step_pre_hook\n"
        f"register_optimizer_step_pre_hook(lambda *_: time.sleep({step_seconds}))\n"
    )
    return os.pathsep.join(filter(None, [str(folder), pythonpath]))


def wait_for(condition, what: str, workdir: Path, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what}:\n{run_log(None, workdir)}"
        time.sleep(0.2)


def job_state(job: str) -> str:
    """`scontrol -o show job` (jobs stay visible for MinJobAge, 300 s, after they end)."""
    return subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30
    ).stdout


def train_genus_through_slurm(
    tiny_pipeline, repo_root: Path, tmp_path: Path, step_seconds: float, extra_args=(), during=None
) -> tuple[str, Path]:
    """The tiny run copied without its genus results; genus trains through the user profile on
    the local cluster, each optimizer step throttled by ``step_seconds``; ``during(workdir,
    log)`` runs while Snakemake does. Returns Snakemake's output and the working folder, after
    checking that genus ended with the uninterrupted local run's model, tensor for tensor."""
    workdir = tmp_path / "wf"
    shutil.copytree(tiny_pipeline.workdir, workdir, symlinks=True)
    shutil.rmtree(workdir / "results" / "genus")
    shutil.rmtree(workdir / "logs" / "train", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_PROFILE")}
    env.pop("SLURM_JOB_ID", None)
    env["PYTHONPATH"] = throttled_pythonpath(
        tmp_path / "throttle", step_seconds, env.get("PYTHONPATH")
    )
    cmd = [sys.executable, "-m", "snakemake", "results/genus/model.pt", "--cores", "2",
           "--profile", str(repo_root / "slurm"), "--profile", str(repo_root / "slurm" / "local"),
           "--snakefile", str(repo_root / "Snakefile"),
           "--directory", str(workdir), "--slurm-keep-successful-logs",
           *extra_args,
           "--configfile", str(tiny_pipeline.configfile)]  # fmt: skip
    run = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = workdir / "logs" / "train" / "genus.log"
    try:
        if during is not None:
            during(workdir, log)
        output, _ = run.communicate(timeout=TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"{output[-6000:]}\n{run_log(None, workdir)}"

    text = log.read_text(errors="replace")
    assert "resuming after step" in text, text[-4000:]
    size = genus_size(workdir, tiny_pipeline.configfile, repo_root)
    assert f"genus epoch {size.epochs}: " in text, text[-4000:]
    resumed = torch.load(workdir / "results/genus/model.pt", map_location="cpu", weights_only=True)
    straight = torch.load(
        tiny_pipeline.workdir / "results/genus/model.pt", map_location="cpu", weights_only=True
    )
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    assert not (workdir / "results" / "genus" / "last.pt").exists()
    return output, workdir


@pytest.mark.slow
def test_a_preempted_train_job_is_resubmitted_and_resumes_to_the_same_model(
    slurm_cluster, tiny_pipeline, repo_root, tmp_path, run_command
):
    """SLURM signals the train job's step (scancel --signal=TERM, what --signal=TERM@120 sends
    before a time limit) after its first epoch: training saves last.pt and exits 75, the job
    fails, and the profile's retries submit a second job, with the second attempt's request,
    that resumes to the uninterrupted model. (48 steps of 0.3 s: about 15 s of training.)"""

    def preempt_after_first_epoch(workdir: Path, log: Path) -> None:
        wait_for(lambda: len(slurm_job_ids(workdir, "train")) == 1, "train job", workdir)
        wait_for(
            lambda: log.exists() and "genus epoch 1: " in log.read_text(errors="replace"),
            "first epoch",
            workdir,
        )
        subprocess.run(
            ["scancel", "--signal=TERM", slurm_job_ids(workdir, "train")[0]],
            check=True,
            timeout=30,
        )

    output, workdir = train_genus_through_slurm(
        tiny_pipeline, repo_root, tmp_path, 0.3, during=preempt_after_first_epoch
    )
    first, second = slurm_job_ids(workdir, "train")
    assert "JobState=FAILED" in job_state(first), job_state(first)
    # Training exited 75; the job's own Snakemake did not restart it in its allocation, the
    # submitting one did.
    first_log = next((workdir / ".snakemake/slurm_logs/rule_train").rglob(f"{first}.log"))
    shown = first_log.read_text(errors="replace")
    assert "returned non-zero exit status 75" in shown, shown
    assert "Trying to restart job" not in shown, shown
    assert "Trying to restart job" in output, output[-6000:]
    resubmitted = job_state(second)
    assert "JobState=COMPLETED" in resubmitted, resubmitted
    size = genus_size(workdir, tiny_pipeline.configfile, repo_root)
    hours, minutes = divmod(job_resources("train", size, attempt=2).runtime, 60)
    assert f"TimeLimit={hours:02d}:{minutes:02d}:00 " in resubmitted, resubmitted


@pytest.mark.slow
def test_a_train_job_killed_at_its_time_limit_is_resubmitted_and_resumes_to_the_same_model(
    slurm_cluster, tiny_pipeline, repo_root, tmp_path, run_command
):
    """A one-minute time limit and no early signal: SLURM sends SIGTERM at the limit and kills
    the job KillWait (5 s) later. Training, 48 steps of 2 s (about 100 s, longer than one job's
    minute), saves last.pt before the kill; the job ends TIMEOUT, and the profile's retries
    submit jobs that resume it until it ends with the uninterrupted model."""
    # Every attempt gets the one minute; slurm_extra without the early --signal=TERM@120 (with
    # a one-minute limit it would come at once), the partition as the local profile sets it.
    limit = ["--set-resources", "train:runtime=1", "train:slurm_partition='main'",
             "train:slurm_extra='--nice=0'"]  # fmt: skip
    output, workdir = train_genus_through_slurm(
        tiny_pipeline, repo_root, tmp_path, 2.0, extra_args=limit
    )
    jobs = slurm_job_ids(workdir, "train")
    assert len(jobs) >= 2, output[-6000:]
    for job in jobs[:-1]:
        assert "JobState=TIMEOUT" in job_state(job), job_state(job)
    assert "JobState=COMPLETED" in job_state(jobs[-1]), job_state(jobs[-1])
    assert "TimeLimit=00:01:00 " in job_state(jobs[-1]), job_state(jobs[-1])
