"""End-to-end on SLURM: the tiny pipeline's data stage, then one rank's train and evaluate,
submitted through the user profile (slurm/config.yaml) plus the test cluster's overrides
(slurm/local/config.yaml) to the real local cluster, each job asking for its measured memory
and time (promptcam.resources)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
    classes, train, val, test = read_split_counts(workdir / "results/data/labels/genus.tsv")
    config = merged(
        yaml.safe_load((repo_root / "config" / "config.yaml").read_text()),
        yaml.safe_load(configfile.read_text()),
    )
    validate_config(config, repo_root / "workflow" / "schemas" / "config.schema.yaml")
    epochs = rank_train_settings(config["train"], "genus", config["levels"])["epochs"]
    size = JobSize(train + val + test, train, val, test, classes, epochs)
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
