"""End-to-end: the repo's slurm/ profile runs a tiny workflow through a real SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SNAKEFILE = """
rule all:
    input: "cpu.env", "gpu.env"

rule cpu:
    output: "cpu.env"
    shell: "env | sort > {output}"

rule gpu:
    output: "gpu.env"
    threads: 2
    resources: gpu=1
    shell: "env | sort > {output}"
"""


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def run_log(proc: subprocess.CompletedProcess | None, workdir: Path) -> str:
    parts = [] if proc is None else [proc.stdout[-6000:], proc.stderr[-6000:]]
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n{log.read_text()[-3000:]}")
    return "\n".join(parts)


def scontrol_job(job_id: str) -> str:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30
    )
    return shown.stdout


@pytest.mark.slow
def test_profile_runs_jobs_through_slurm(slurm_cluster, repo_root, tmp_path):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_PROFILE")}
    env.pop("SLURM_JOB_ID", None)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "8",
           "--profile", str(repo_root / "slurm"), "--directory", str(workdir),
           "--snakefile", str(workdir / "Snakefile")]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(f"snakemake ran past 300 s:\n{out[-6000:]}\n{run_log(None, workdir)}")
    assert proc.returncode == 0, f"snakemake failed:\n{run_log(proc, workdir)}"

    cpu = read_env(workdir / "cpu.env")
    gpu = read_env(workdir / "gpu.env")
    # Both ran inside SLURM jobs, as different jobs.
    assert cpu.get("SLURM_JOB_ID"), cpu
    assert gpu.get("SLURM_JOB_ID"), gpu
    assert cpu["SLURM_JOB_ID"] != gpu["SLURM_JOB_ID"]
    # gpu=1 became `sbatch --gpus=1` and `srun --gpus=1`: the step holds the fake GPU.
    assert gpu.get("SLURM_GPUS_ON_NODE") == "1", gpu
    assert gpu.get("SLURM_STEP_GPUS") == "0", gpu
    assert gpu.get("CUDA_VISIBLE_DEVICES") == "0", gpu
    assert gpu.get("SLURM_CPUS_PER_TASK") == "2", gpu  # threads: 2
    assert "SLURM_STEP_GPUS" not in cpu and "SLURM_GPUS_ON_NODE" not in cpu, cpu
    # slurmctld's record (completed jobs stay visible for MinJobAge = 300 s).
    cpu_job, gpu_job = scontrol_job(cpu["SLURM_JOB_ID"]), scontrol_job(gpu["SLURM_JOB_ID"])
    for job in (cpu_job, gpu_job):
        assert "JobState=COMPLETED" in job, job
        assert f"Partition={slurm_cluster.partition} " in job, job
    assert "gres:gpu:1" in gpu_job or "gres/gpu:1" in gpu_job, gpu_job
    assert "gres:gpu" not in cpu_job and "gres/gpu" not in cpu_job, cpu_job
