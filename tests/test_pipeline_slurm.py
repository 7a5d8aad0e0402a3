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
    return sorted(path.stem for path in logs)


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


# A train job of the retry test sleeps this long before each optimizer step: the tiny genus
# run's 48 steps then last about 15 s, long enough to signal it between its first and last epoch.
STEP_SECONDS = 0.3
THROTTLE = f"""import time
from torch.optim.optimizer import register_optimizer_step_pre_hook
register_optimizer_step_pre_hook(lambda *_: time.sleep({STEP_SECONDS}))
"""


def wait_for(condition, what: str, workdir: Path, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what}:\n{run_log(None, workdir)}"
        time.sleep(0.2)


@pytest.mark.slow
def test_snakemake_retries_a_preempted_train_job_and_it_resumes_to_the_same_model(
    slurm_cluster, tiny_pipeline, repo_root, tmp_path, run_command
):
    """The tiny run copied without its genus results; genus trains through the user profile
    on the local cluster, and SLURM signals the job's step (scancel --signal=TERM, what
    --signal=TERM@120 sends before a time limit) after its first epoch. Training exits 75
    with last.pt saved, the rule's retries restart it, and it resumes to the model the
    uninterrupted local run trained, tensor for tensor."""
    workdir = tmp_path / "wf"
    shutil.copytree(tiny_pipeline.workdir, workdir, symlinks=True)
    shutil.rmtree(workdir / "results" / "genus")
    shutil.rmtree(workdir / "logs" / "train", ignore_errors=True)
    site = tmp_path / "throttle"
    site.mkdir()
    (site / "sitecustomize.py").write_text(THROTTLE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_PROFILE")}
    env.pop("SLURM_JOB_ID", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "snakemake", "results/genus/model.pt", "--cores", "2",
           "--profile", str(repo_root / "slurm"), "--profile", str(repo_root / "slurm" / "local"),
           "--snakefile", str(repo_root / "Snakefile"),
           "--directory", str(workdir), "--slurm-keep-successful-logs",
           "--configfile", str(tiny_pipeline.configfile)]  # fmt: skip
    run = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = workdir / "logs" / "train" / "genus.log"
    try:
        wait_for(lambda: len(slurm_job_ids(workdir, "train")) == 1, "train job", workdir)
        first = slurm_job_ids(workdir, "train")[0]
        wait_for(
            lambda: log.exists() and "genus epoch 1: " in log.read_text(errors="replace"),
            "first epoch",
            workdir,
        )
        subprocess.run(["scancel", "--signal=TERM", first], check=True, timeout=30)
        output, _ = run.communicate(timeout=TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"{output[-6000:]}\n{run_log(None, workdir)}"

    # The retry runs where the job runs: the Snakemake inside the SLURM job applies the
    # rule's retries, so the one job exits 75, is restarted in its allocation and resumes.
    assert slurm_job_ids(workdir, "train") == [first], run_log(None, workdir)
    job_log = next((workdir / ".snakemake" / "slurm_logs" / "rule_train").rglob(f"{first}.log"))
    shown = job_log.read_text(errors="replace")
    assert "returned non-zero exit status 75" in shown and "Trying to restart job" in shown, shown
    text = log.read_text(errors="replace")
    assert "resuming after step" in text, text[-4000:]
    size = genus_size(workdir, tiny_pipeline.configfile, repo_root)
    assert f"genus epoch {size.epochs}: " in text, text[-4000:]
    state = subprocess.run(
        ["scontrol", "-o", "show", "job", first], capture_output=True, text=True, timeout=30
    ).stdout
    assert "JobState=COMPLETED" in state, state
    resumed = torch.load(workdir / "results/genus/model.pt", map_location="cpu", weights_only=True)
    straight = torch.load(
        tiny_pipeline.workdir / "results/genus/model.pt", map_location="cpu", weights_only=True
    )
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    assert not (workdir / "results" / "genus" / "last.pt").exists()
