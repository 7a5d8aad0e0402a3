"""The SLURM profiles: the user profile's content (placeholders, GPU rules, measured resources)
and, end to end, the user profile plus the test cluster's overrides running a tiny workflow
through a real SLURM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SLURM_PARTITION

from promptcam.config import runtime_keys
from promptcam.resources import GPU_RULES, MEASURED, SHARDED_STAGES, UNITS, gathering_rule

PLACEHOLDER = re.compile(r"^<[a-z-]+>$")
# What the test cluster's profile may override: its status command, accounts, check interval,
# and the whole resource mappings (a later --profile replaces top-level keys).
TEST_CLUSTER_KEYS = {
    "slurm-status-command",
    "slurm-no-account",
    "slurm-init-seconds-before-status-checks",
    "default-resources",
    "set-resources",
}
RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", re.S | re.M)
SITE_KEYS = {"slurm_account", "slurm_partition", "constraint"}


def profile(repo_root: Path, *parts: str) -> dict:
    return yaml.safe_load((repo_root.joinpath("slurm", *parts, "config.yaml")).read_text())


def workflow_rules(repo_root: Path) -> dict[str, str]:
    """{rule name: its body} of every rule in workflow/rules/*.smk."""
    rules = {}
    for smk in sorted((repo_root / "workflow" / "rules").glob("*.smk")):
        for name, body in RULE.findall(smk.read_text()):
            rules[name] = body
    return rules


def resources_block(body: str) -> str:
    found = re.search(r"^    resources:\n((?:        .*\n)+)", body, re.M)
    return found.group(1) if found else ""


def reads_a_device(script: Path) -> bool:
    """Whether a rule's adapter gives its job a device setting (``["device"]`` of a config
    section, or the runtime settings of a section whose schema has a ``device`` key): the job
    runs a model there, on a GPU where there is one."""
    text = script.read_text()
    if re.search(r"\[\"device\"\]", text):
        return True
    sections = re.findall(r'runtime_settings\(snakemake\.config, "([\w.]+)"\)', text)
    return any("device" in runtime_keys(section) for section in sections)


def test_user_profile_has_placeholders_for_the_site(repo_root):
    user = profile(repo_root)
    defaults = user["default-resources"]
    assert PLACEHOLDER.match(defaults["slurm_account"]), defaults
    assert PLACEHOLDER.match(defaults["slurm_partition"]), defaults
    assert user["retries"] >= 1
    gpu_partitions = {entry["slurm_partition"] for entry in user["set-resources"].values()}
    constraints = {entry["constraint"] for entry in user["set-resources"].values()}
    assert len(gpu_partitions) == 1 and PLACEHOLDER.match(gpu_partitions.pop())
    assert len(constraints) == 1 and PLACEHOLDER.match(constraints.pop())
    assert gpu_partitions.isdisjoint({defaults["slurm_partition"]})
    text = (repo_root / "slurm" / "config.yaml").read_text()
    # How the rules' software is deployed is the site's choice: both ways are there, commented.
    assert re.search(r"^# software-deployment-method: conda$", text, re.M), text
    assert re.search(r"^# software-deployment-method: apptainer$", text, re.M), text
    # The test cluster's settings live in slurm/local/config.yaml only.
    assert not (TEST_CLUSTER_KEYS - {"default-resources", "set-resources"}) & set(user)


def test_retries_are_the_profiles_and_no_rules(repo_root):
    """A rule's `retries` also apply inside its SLURM job (Snakemake's --retries 0 for the job
    loses to a rule's own value) and restart it in its dying allocation; the profile's apply
    only where jobs are submitted (tests/test_pipeline_slurm.py runs both paths)."""
    with_retries = [
        name
        for name, body in workflow_rules(repo_root).items()
        if re.search(r"^    retries:", body, re.M)
    ]
    assert not with_retries, with_retries
    assert profile(repo_root)["retries"] >= 1


def test_gpu_asked_for_exactly_by_the_rules_that_use_one(repo_root):
    rules = workflow_rules(repo_root)
    wrong = []
    for name, body in rules.items():
        script = re.search(r'script:\s*\n\s*"([^"]+)"', body)
        if script is None:
            continue
        uses = reads_a_device(repo_root / "workflow" / "rules" / script.group(1))
        asks = "gpu=" in resources_block(body)
        if uses != asks or (name in GPU_RULES) != asks:
            wrong.append(
                f"{name}: reads a device {uses}, asks gpu {asks}, GPU_RULES {name in GPU_RULES}"
            )
    assert not wrong, "\n".join(wrong)
    assert {"train", "evaluate", "traits", "fidelity"} <= GPU_RULES
    assert "localization" not in GPU_RULES


def test_set_resources_name_exactly_the_gpu_rules(repo_root):
    rules = workflow_rules(repo_root)
    gpu_rules = {name for name, body in rules.items() if "gpu=" in resources_block(body)}
    for parts in ((), ("local",)):
        entries = profile(repo_root, *parts)["set-resources"]
        assert set(entries) == gpu_rules, (parts, sorted(entries), sorted(gpu_rules))
        assert set(entries) <= set(rules)


def test_every_rule_asks_for_its_measured_resources(repo_root):
    rules = workflow_rules(repo_root)
    cluster_rules = {name for name, body in rules.items() if "localrule: True" not in body}
    missing = [
        name
        for name in sorted(cluster_rules)
        if not {"mem_mb=measured_mem_mb,", "runtime=measured_runtime,"}
        <= {line.strip() for line in resources_block(rules[name]).splitlines()}
    ]
    assert not missing, f"rules without measured resources: {missing}"
    # A sharded stage's rule is renamed when it only gathers (test_shard_groups > 1).
    cluster_rules |= {gathering_rule(stage) for stage in SHARDED_STAGES}
    assert set(MEASURED) == cluster_rules, sorted(set(MEASURED) ^ cluster_rules)
    assert set(UNITS) == set(MEASURED)


def planned_jobs(repo_root: Path, workdir: Path, *config: str) -> list[tuple[str, dict]]:
    """(rule, resources) of every job of the tiny pipeline that `snakemake -n` plans with the
    user profile: the resources as Snakemake resolved them, the profile's included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_PROFILE")}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", str(repo_root / "slurm"),
           "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(repo_root / "tests" / "configs" / "pipeline_tiny.yaml"),
           "--config", "gpus_per_job=1", *config]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    jobs, rule = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[len("rule ") : -1]
        elif line.startswith("    resources: ") and rule is not None:
            pairs = (item.split("=", 1) for item in line[len("    resources: ") :].split(", "))
            jobs.append((rule, dict(pairs)))
            rule = None
    return jobs


@pytest.mark.parametrize("groups", [1, 3])
def test_only_jobs_that_use_a_gpu_ask_for_one_and_go_to_the_gpu_partition(
    repo_root, tmp_path, groups
):
    """With the test split shared among 3 groups, the part jobs run the model on a GPU and the
    renamed gathering jobs only read parts: no GPU, the CPU partition."""
    jobs = planned_jobs(repo_root, tmp_path, f"test_shard_groups={groups}")
    names = {rule for rule, _ in jobs}
    gathers = {gathering_rule(stage) for stage in SHARDED_STAGES}
    parts = {f"{stage}_part" for stage in SHARDED_STAGES}
    if groups == 1:
        assert not names & (gathers | parts), sorted(names)
        assert set(SHARDED_STAGES) <= names
    else:
        assert gathers | parts <= names and not names & set(SHARDED_STAGES), sorted(names)
    wrong = []
    for rule, resources in jobs:
        if rule == "all":
            continue
        gpu = int(resources.get("gpu", 0)) > 0
        partition = resources["slurm_partition"]
        if gpu != (rule in GPU_RULES) or gpu != (partition == "<gpu-partition>"):
            wrong.append(f"{rule}: gpu {resources.get('gpu')}, partition {partition}")
        if not gpu and (partition != "<cpu-partition>" or "constraint" in resources):
            wrong.append(f"{rule}: a CPU job with {resources}")
    assert not wrong, "\n".join(wrong)


def test_test_profile_overrides_only_the_test_cluster_settings(repo_root):
    user, local = profile(repo_root), profile(repo_root, "local")
    assert set(local) <= TEST_CLUSTER_KEYS, sorted(set(local) - TEST_CLUSTER_KEYS)
    assert local["slurm-status-command"] == "squeue"
    assert local["default-resources"]["slurm_partition"] == SLURM_PARTITION
    # default-resources replaces the user's whole mapping: it keeps every non-site entry.
    kept = {k: v for k, v in user["default-resources"].items() if k not in SITE_KEYS}
    assert kept.items() <= local["default-resources"].items(), (kept, local)
    assert "slurm_account" not in local["default-resources"]
    for entry in local["set-resources"].values():
        assert entry == {"slurm_partition": SLURM_PARTITION}, entry


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
    # The user profile as it is, plus the test cluster's overrides (slurm/local/config.yaml).
    cmd = [sys.executable, "-m", "snakemake", "--cores", "8",
           "--profile", str(repo_root / "slurm"), "--profile", str(repo_root / "slurm" / "local"),
           "--directory", str(workdir), "--snakefile", str(workdir / "Snakefile")]  # fmt: skip
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
