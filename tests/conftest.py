"""Shared pytest setup: session environment, repo_root, a real local SLURM cluster, and
run_command (a subprocess run that cleans up after a timeout)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Set for the whole session, before any test module imports torch/timm/ete3/matplotlib.
os.environ["HF_HUB_OFFLINE"] = "1"  # no model downloads here, ever
os.environ["QT_QPA_PLATFORM"] = "offscreen"  # ete3/PyQt5 aborts the process without a display
os.environ["MPLBACKEND"] = "Agg"  # ete3 rendering may otherwise switch matplotlib to Qt
os.environ.pop("OMP_NUM_THREADS", None)  # let torch pick its threads; no inherited caps

SLURM_PARTITION = "main"  # must match slurm/local/config.yaml default-resources.slurm_partition
# The pidfiles of the local cluster's daemons (slurm/local/start.sh, stop.sh).
SLURM_PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurm/slurmctld.pid"),
    "slurmd": Path("/run/slurm/slurmd.pid"),
}


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Say how the tests were ordered, even under -q: a failure in a shuffled order must be
    repeatable (pytest-randomly, a test extra, shuffles with a fresh seed on every run)."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(
            f"test order: shuffled, seed {seed} (repeat it: -p randomly --randomly-seed={seed};"
            " file order: -p no:randomly)"
        )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding Snakefile, slurm/, tests/)."""
    return REPO_ROOT


def daemons_alive() -> set[str]:
    """The local cluster's daemons whose pidfile names a live process."""
    alive = set()
    for name, pidfile in SLURM_PIDFILES.items():
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
        except (OSError, ValueError):
            continue
        alive.add(name)
    return alive


def stop_started_daemons(repo_root: Path, before: set[str]) -> None:
    """Stop the local cluster if this session started it (not if CI or a person had, nor while
    jobs of another session are still queued); munged too unless it ran before."""
    started = {"slurmctld", "slurmd"} - before
    if not started:
        return
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30)
    if queue.returncode == 0 and queue.stdout.strip():
        return
    args = ["--keep-munge"] if "munged" in before else []
    subprocess.run(
        ["bash", str(repo_root / "slurm" / "local" / "stop.sh"), *args],
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def slurm_cluster(repo_root: Path):
    """A running one-node SLURM (slurm/local/start.sh); installs it with apt if needed.

    Skips only where it cannot run (not root, apt-get unusable); under CI=true it fails
    instead, so CI never silently drops the SLURM tests. A cluster that was already up (CI's
    .ci/run starts it) is left running; one this session started is stopped at its end.
    """
    in_ci = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

    def cannot_run(why: str):
        if in_ci:
            pytest.fail(f"local SLURM is required in CI: {why}")
        pytest.skip(f"local SLURM unavailable: {why}")

    if os.geteuid() != 0:
        cannot_run("slurm/local/start.sh needs root (it installs packages, starts daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        cannot_run("SLURM is not installed and there is no apt-get to install it")

    env = {**os.environ, "SLURM_LOCAL_PARTITION": SLURM_PARTITION}
    before = daemons_alive()
    proc = subprocess.run(
        ["bash", str(repo_root / "slurm" / "local" / "start.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    log = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode == 77:
        cannot_run(f"start.sh says it cannot run here:\n{log}")
    if proc.returncode != 0:
        stop_started_daemons(repo_root, before)
        pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{log}")
    started = bool({"slurmctld", "slurmd"} - before)
    try:
        yield SimpleNamespace(partition=SLURM_PARTITION, log=log, started=started)
    finally:
        stop_started_daemons(repo_root, before)


def run_in_own_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), but on a timeout kill the command's
    whole process group (Snakemake's job processes too, not only Snakemake), then raise
    subprocess.TimeoutExpired with the output so far."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Let Snakemake stop its jobs and write its log, then kill whatever is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_snakemake(
    workdir: Path, *args: str, configfile: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The repo's workflow run for real in ``workdir`` (``--directory``), on 2 cores."""
    # Targets first: --configfile takes several values and would swallow them.
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(REPO_ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
    ]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return run_in_own_group(cmd, timeout=timeout)


@pytest.fixture(scope="session")
def snakemake_run():
    """run_snakemake: the workflow in a given directory, killed as a group on a timeout."""
    return run_snakemake


@pytest.fixture(scope="session")
def run_command():
    """run_in_own_group: run a command, killing its whole process group on a timeout."""
    return run_in_own_group


TINY_PIPELINE_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def tiny_pipeline(repo_root, tmp_path_factory) -> SimpleNamespace:
    """The whole pipeline (rule all) run once per session on tests/configs/pipeline_tiny.yaml
    in a fresh working directory: ``workdir``, ``configfile``, ``stderr`` (Snakemake's console).

    Shared by the end-to-end tests and the figure tests, which read its output files. While
    developing, PROMPTCAM_TINY_RUN=DIR reuses a finished run of that config in DIR (then
    ``stderr`` is empty); CI never sets it.
    """
    configfile = repo_root / "tests" / "configs" / "pipeline_tiny.yaml"
    reuse = os.environ.get("PROMPTCAM_TINY_RUN")
    if reuse:
        return SimpleNamespace(workdir=Path(reuse), configfile=configfile, stderr="")
    workdir = tmp_path_factory.mktemp("pipeline")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2",
           "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile)]  # fmt: skip
    try:
        proc = run_in_own_group(cmd, timeout=TINY_PIPELINE_TIMEOUT_S, cwd=workdir)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the tiny pipeline ran past {TINY_PIPELINE_TIMEOUT_S} s:\n{exc.stderr}")
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {log.relative_to(workdir)}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted((workdir / "logs").rglob("*.log"))
        )
        pytest.fail(
            f"the tiny pipeline failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}\n{logs}"
        )
    return SimpleNamespace(workdir=workdir, configfile=configfile, stderr=proc.stderr)
