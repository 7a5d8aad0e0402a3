"""End-to-end: the whole pipeline (rule all) on a tiny demo through Snakemake, then reruns.

One real run (tests/configs/pipeline_tiny.yaml, about 2-3 minutes on 2 CPU cores) is shared by
the tests below, in any order, and by the figure tests (conftest.tiny_pipeline): the contract
files, the figures and the report, the progress lines on the console and a dry run after editing
one rank's settings and every runtime key only read it; the forced rerun of one rank works on
its own copy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from figure_checks import assert_fonts_embedded_truetype, assert_png_shows_something, pdf_page_mm

from promptcam.config import all_runtime_keys, config_section, validate_config
from promptcam.data.metadata import read_label_map
from promptcam.data.taxonomy import classes_at_rank, load_taxonomy
from promptcam.evaluation.tables import read_heads_table, read_localization_table
from promptcam.io import sha256_file
from promptcam.model.checkpoint import load_checkpoint

RANKS = ("family", "genus", "species")
N_CLASSES = {"family": 2, "genus": 4, "species": 8}
N_IMAGES = 2 * 2 * 2 * 10  # pipeline_tiny: 2x2x2 species, 10 images each
PER_RANK_JOBS = {
    "train", "linear_probe", "evaluate", "head_information", "traits", "heads", "cam_maps", "localization",
    "fidelity",
}  # fmt: skip
PER_RANK_FIGURES = {"trait_panels", "trait_gallery", "cross_class_figure", "confusion_figure"}
# Figures across ranks: each reads every rank's files, so any rank's rerun redraws them.
CROSS_RANK_FIGURES = {"coarse_to_fine", "tree_overview", "accuracy_figure",
                      "training_curves_figure", "fidelity_curves_figure",
                      "counterfactual_figure", "localization_figure"}  # fmt: skip
TIMEOUT_S = 900
TINY_EPOCHS = yaml.safe_load(
    (Path(__file__).parent / "configs" / "pipeline_tiny.yaml").read_text()
)["train"]["defaults"]["epochs"]


def snakemake_cmd(
    repo_root: Path, workdir: Path, configfile: Path, *extra: str, targets: tuple[str, ...] = ()
) -> list[str]:
    # Targets first: --configfile, --forcerun and the like take several values each.
    return [sys.executable, "-m", "snakemake", *targets, "--cores", "2",
            "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
            *extra, "--configfile", str(configfile)]  # fmt: skip


def job_logs(workdir: Path) -> str:
    parts = []
    for log in sorted((workdir / "logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def run(run_command, cmd: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Run snakemake; on a timeout or a failure, fail with its output and the job logs."""
    try:
        proc = run_command(cmd, timeout=TIMEOUT_S, cwd=workdir)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr or ""
        pytest.fail(f"snakemake ran past {TIMEOUT_S} s:\n{out[-6000:]}\n{job_logs(workdir)}")
    if proc.returncode != 0:
        pytest.fail(
            f"snakemake failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n{job_logs(workdir)}"
        )
    return proc


def planned_jobs(dry_run_output: str) -> set[tuple[str, str | None]]:
    """(rule, rank) of every job a `snakemake -n` run lists (rank None without wildcards)."""
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", "\n" + dry_run_output):
        head = re.match(r"\s*(?:local)?rule (\w+):", block)
        if head is None:
            continue
        rank = re.search(r"wildcards: rank=(\w+)", block)
        jobs.add((head.group(1), rank.group(1) if rank else None))
    return jobs


def assert_reruns(jobs: set, genus_rules: set[str], output: str) -> None:
    """Exactly ``genus_rules`` of genus rerun, plus figures that read genus's files and no
    other rank's job (a figure whose inputs came out byte-identical may be skipped: Snakemake
    compares small files' checksums when their mtime changed)."""
    required = {(rule, "genus") for rule in genus_rules}
    figures = {(rule, "genus") for rule in PER_RANK_FIGURES}
    figures |= {(rule, None) for rule in CROSS_RANK_FIGURES}
    assert required <= jobs, (sorted(required - jobs), output)
    assert jobs <= required | figures, (sorted(jobs - required - figures), output)


def mtimes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    """The session's one run of the whole pipeline on pipeline_tiny (conftest.tiny_pipeline):
    the directory, the config file and what Snakemake printed on the console (stderr)."""
    return tiny_pipeline.workdir, tiny_pipeline.configfile, tiny_pipeline.stderr


def is_share(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_pipeline_writes_every_contract_file(tiny_run):
    workdir, _, _ = tiny_run
    results = workdir / "results"

    # Data stage.
    data = results / "data"
    table = pd.read_parquet(data / "metadata.parquet")
    assert len(table) == N_IMAGES
    assert {"sample_id", "image", "mask", *RANKS, "split"} <= set(table)
    labels = {}
    for rank in RANKS:
        labels[rank] = read_label_map(data / "labels" / f"{rank}.tsv")
        assert len(labels[rank]) == N_CLASSES[rank]
        assert labels[rank]["index"].tolist() == list(range(N_CLASSES[rank]))
        assert labels[rank]["count"].sum() == N_IMAGES
    tree = load_taxonomy(data / "taxonomy.nwk")
    for rank in RANKS:
        assert sorted(classes_at_rank(tree, rank)) == sorted(labels[rank]["name"])
    manifest = json.loads((results / "shards" / "manifest.json").read_text())
    tars = sorted(path.name for path in (results / "shards").glob("*.tar"))
    assert tars == sorted(entry["file"] for entry in manifest["shards"])
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(results / "shards" / entry["file"])
    n_test = int((table["split"] == "test").sum())
    assert manifest["splits"]["test"]["n_samples"] == n_test > 0

    localized = 0
    for rank in RANKS:
        out = results / rank
        # Train: the checkpoint rebuilds a Prompt-CAM over this rank's classes.
        model, meta = load_checkpoint(out / "model.pt")
        assert list(meta.label_names) == labels[rank]["name"].tolist()
        assert model.config.num_classes == N_CLASSES[rank]
        assert model.config.layout == "scalable"
        metrics = pd.read_csv(out / "metrics.tsv", sep="\t")
        assert metrics["epoch"].tolist() == list(range(1, TINY_EPOCHS + 1))
        assert {"train_loss", "val_top1"} <= set(metrics)
        assert metrics["train_loss"].map(math.isfinite).all()

        # Evaluate.
        evaluation = json.loads((out / "eval.json").read_text())
        for key in ("top1", "top5", "linear_probe_top1"):
            assert is_share(evaluation[key]), (rank, key, evaluation[key])
        assert evaluation["top5"] >= evaluation["top1"]
        assert evaluation["n_test"] == n_test
        confusion = pd.read_csv(out / "confusion.tsv", sep="\t")
        assert len(confusion) == N_CLASSES[rank]

        # Traits: one row per test image and head.
        traits = pd.read_parquet(out / "traits.parquet")
        assert len(traits) > 0
        assert set(traits["image"].unique()) <= set(
            table.loc[table["split"] == "test", "sample_id"]
        )
        assert {"target", "predicted", "correct", "head"} <= set(traits)
        for name in ("trait_maps.npz", "trait_summary.tsv", "trait_summary.npz",
                     "cross_class.tsv", "cross_class.npz", "counterfactual.json"):  # fmt: skip
            assert (out / name).stat().st_size > 0, name

        # Localisation against the demo's trait masks (None where no image was explained).
        localization = json.loads((out / "localization.json").read_text())
        for key in ("pointing_game", "energy_in_mask"):
            value = localization[key]
            assert is_share(value) or (value is None and localization["n_images"] == 0), (
                rank,
                key,
                value,
            )
        localized += localization["n_images"] > 0
        # Every method's localisation with both chance levels, and one row per head.
        located = read_localization_table(out / "localization.tsv")
        assert {"prompt_cam_top_head", "prompt_cam_kept_heads", "random"} <= set(located["method"])
        assert {"prompt_cam", "linear_probe"} <= set(located["model"])
        fixed_place = located["pointing_game_fixed_place"]
        assert fixed_place.notna().all() or localization["n_images"] == 0, located
        heads = read_heads_table(out / "heads.tsv")
        assert heads["head"].tolist() == list(range(model.num_heads)), heads
        assert heads["class_information"].map(is_share).all(), heads

        # Fidelity: Prompt-CAM against at least four baseline CAMs.
        fidelity = pd.read_csv(out / "fidelity.tsv", sep="\t")
        assert {"method", "insertion", "deletion"} <= set(fidelity)
        assert fidelity["method"].nunique() >= 5
        assert "prompt_cam" in set(fidelity["method"])
        assert fidelity["insertion"].map(is_share).all()
        assert fidelity["deletion"].map(is_share).all()

        for stage, name in (("train", rank), ("evaluate", rank), ("traits", f"traits_{rank}")):
            assert (workdir / "logs" / stage / f"{name}.log").exists()
            assert (results / "benchmarks" / stage / f"{name}.tsv").exists()
    assert localized >= 1, "no rank had a correctly classified test image to localise"


def figure_pairs(folder: Path) -> list[Path]:
    """Stems of the figures in ``folder``, each written as PDF and PNG (asserted)."""
    stems = sorted(path.with_suffix("") for path in folder.glob("*.pdf"))
    assert stems, f"no figures in {folder}"
    assert stems == sorted(path.with_suffix("") for path in folder.glob("*.png")), folder
    return stems


@pytest.mark.slow
def test_pipeline_draws_every_figure_paper_ready_and_the_report_builds(
    tiny_run, run_command, repo_root
):
    workdir, configfile, _ = tiny_run
    results = workdir / "results"
    config = validate_config(yaml.safe_load(configfile.read_text()))
    widths = {config["figures"]["style"]["single_column_mm"],
              config["figures"]["style"]["double_column_mm"]}  # fmt: skip
    stems = []
    for rank in RANKS:
        figures = results / rank / "figures"
        stems += figure_pairs(figures / "trait_panels")
        stems += figure_pairs(figures / "gallery")
        stems += [figures / "cross_class", figures / "confusion"]
    stems += figure_pairs(results / "figures" / "coarse_to_fine")
    stems += [results / "figures" / name for name in ("tree_rectangular", "tree_circular",
              "accuracy", "training_curves", "fidelity_curves", "counterfactual",
              "localization")]  # fmt: skip
    for stem in stems:
        pdf, png = stem.with_suffix(".pdf"), stem.with_suffix(".png")
        assert_fonts_embedded_truetype(pdf)
        width, height = pdf_page_mm(pdf)
        assert any(abs(width - column) < 0.5 for column in widths), (pdf, width, widths)
        assert height <= config["figures"]["style"]["max_height_mm"] + 0.5, (pdf, height)
        assert_png_shows_something(png, config["figures"]["style"]["dpi"])

    # The report collects every figure with its caption.
    report = workdir / "report.zip"
    cmd = snakemake_cmd(repo_root, workdir, configfile, "--report", str(report))
    run(run_command, cmd, workdir)
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
        pages = archive.read(next(n for n in names if n.endswith("report.html"))).decode()
    for stem in stems:
        shown = stem.with_suffix(".png").relative_to(workdir).as_posix()
        assert shown in pages, f"{shown} is not in the report"
        assert any(n.endswith("/" + stem.with_suffix(".png").name) for n in names), shown
    assert "Coarse to fine" in pages, "the coarse-to-fine caption is missing from the report"


@pytest.mark.slow
def test_long_jobs_report_progress_on_the_console(tiny_run):
    workdir, _, console = tiny_run
    lines = [
        line
        for line in console.splitlines()
        if re.match(r"\[(train|evaluate|traits|fidelity) ", line)
    ]
    for rank in RANKS:
        # pipeline_tiny reports every epoch (train.progress_seconds 0).
        for epoch in range(1, TINY_EPOCHS + 1):
            assert any(
                re.fullmatch(
                    rf"\[train {rank}\] epoch {epoch}/{TINY_EPOCHS} loss \d+\.\d+ val top-1 \d\.\d+ \(\d+ s\)",
                    line,
                )
                for line in lines
            ), (rank, epoch, console[-4000:])
        for job, output in (
            ("train", "model.pt"),
            ("evaluate", "eval.json"),
            ("traits", "traits.parquet"),
            ("fidelity", "fidelity.tsv"),
        ):
            wrote = f"[{job} {rank}] wrote results/{rank}/{output}"
            assert any(line.startswith(wrote) for line in lines), (wrote, console[-4000:])
        # The log keeps the detail: the progress bar and every epoch's metrics.
        log = (workdir / "logs" / "train" / f"{rank}.log").read_text()
        assert "train: 100%" in log and f"{rank} epoch 2: {{'epoch': 2" in log
    assert all(len(line) < 200 for line in lines), max(lines, key=len)


# A different valid value for every key the schema marks runtime (tests/test_config.py pins
# the list): none may rerun anything.
RUNTIME_EDITS = {
    "dataset.threads": 2,
    "demo.threads": 2,
    "evaluate.threads": 2,
    "gpus_per_job": 1,
    "max_threads": 1,
    "pretrain.device": "cpu",
    "shards.threads": 2,
    "train.compile": True,
    "train.device": "auto",
    "train.mixed_precision": False,
    "train.progress_seconds": 11,
    "train.threads": 2,
    "traits.device": "auto",
    "traits.fidelity.device": "auto",
    "traits.fidelity.threads": 2,
    "traits.heads.device": "cpu",
    "traits.heads.threads": 1,
    "traits.progress_seconds": 11,
    "traits.threads": 2,
}


def with_runtime_edits(config: dict) -> dict:
    # A new test_shard_groups adds part jobs and regathers every rank's traits (the schema
    # says so): runtime, but it changes the DAG, so it is not among the edits here.
    assert set(RUNTIME_EDITS) == set(all_runtime_keys()) - {"test_shard_groups"}
    current = validate_config(yaml.safe_load(yaml.safe_dump(config)))
    for key, value in RUNTIME_EDITS.items():
        assert config_section(current, key) != value, key  # a real change
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    validate_config(yaml.safe_load(yaml.safe_dump(config)))
    return config


@pytest.mark.slow
def test_editing_one_ranks_settings_reruns_that_rank_only(tiny_run, repo_root, run_command):
    workdir, configfile, _ = tiny_run
    config = yaml.safe_load(configfile.read_text())
    # genus trains one epoch more: genus and everything downstream of its model rerun.
    config["train"]["ranks"] = {"genus": {"epochs": 3}}
    # Where and how jobs run (every runtime key) is not a rerun trigger.
    config = with_runtime_edits(config)
    edited = workdir / "genus_edited.yaml"
    # safe_dump sorts every mapping's keys: the order of keys must not trigger reruns either.
    edited.write_text(yaml.safe_dump(config, sort_keys=True))

    proc = run(run_command, snakemake_cmd(repo_root, workdir, edited, "--dry-run"), workdir)
    jobs = planned_jobs(proc.stdout)
    assert_reruns(jobs - {("all", None)}, PER_RANK_JOBS, proc.stdout)
    train_genus = next(b for b in proc.stdout.split("\n\n") if "rule train:" in b)
    assert "Params have changed" in train_genus, train_genus

    unchanged = run(
        run_command, snakemake_cmd(repo_root, workdir, configfile, "--dry-run"), workdir
    )
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr


@pytest.mark.slow
def test_forcerun_retrains_one_rank_and_leaves_the_others(
    tiny_run, repo_root, run_command, tmp_path
):
    shared, configfile, _ = tiny_run
    # A copy (modification times and Snakemake's records kept): the shared run stays complete.
    workdir = tmp_path / "pipeline"
    shutil.copytree(shared, workdir, symlinks=True)
    results = workdir / "results"
    before = {rank: mtimes(results / rank) for rank in RANKS}

    target = "results/genus/eval.json"
    forcerun = ("--forcerun", "results/genus/model.pt")
    run(
        run_command,
        snakemake_cmd(repo_root, workdir, configfile, *forcerun, targets=(target,)),
        workdir,
    )

    after = {rank: mtimes(results / rank) for rank in RANKS}
    assert after["family"] == before["family"]
    assert after["species"] == before["species"]
    for name in ("model.pt", "metrics.tsv", "linear_probe.npz", "eval.json", "confusion.tsv"):
        assert after["genus"][name] > before["genus"][name], name
    # Not targeted: genus's traits are now out of date, and only they.
    assert after["genus"]["traits.parquet"] == before["genus"]["traits.parquet"]
    proc = run(run_command, snakemake_cmd(repo_root, workdir, configfile, "--dry-run"), workdir)
    jobs = planned_jobs(proc.stdout) - {("all", None)}
    assert_reruns(jobs, PER_RANK_JOBS - {"train", "linear_probe", "evaluate"}, proc.stdout)
