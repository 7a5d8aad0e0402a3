"""The bundled demo, run as the README runs it: does every rank learn, and do the traits localise?

One real `snakemake --cores 2` run of the default config (config/config.yaml) up to the
evaluation and localisation outputs. The thresholds are the issues' targets.
"""

from __future__ import annotations

import json
import shutil

import pytest

LEVELS = ("family", "genus", "species")


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory, repo_root, snakemake_run):
    work = tmp_path_factory.mktemp("demo")
    shutil.copytree(repo_root / "config", work / "config")
    targets = [
        f"results/{rank}/{name}" for rank in LEVELS for name in ("eval.json", "localization.json")
    ]
    result = snakemake_run(work, *targets, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        rank: {
            "eval": json.loads((work / f"results/{rank}/eval.json").read_text()),
            "localization": json.loads((work / f"results/{rank}/localization.json").read_text()),
        }
        for rank in LEVELS
    }


@pytest.mark.slow
@pytest.mark.parametrize("rank", LEVELS)
def test_every_rank_learns(demo_results, rank):
    assert demo_results[rank]["eval"]["top1"] >= 0.90, demo_results[rank]["eval"]


@pytest.mark.slow
@pytest.mark.xfail(
    reason="pointing game measured 0.31-0.33 on the demo, target 0.8 (issue 4, open)", strict=True
)
@pytest.mark.parametrize("rank", LEVELS)
def test_kept_heads_point_at_the_rank_trait(demo_results, rank):
    localization = demo_results[rank]["localization"]
    assert localization["pointing_game"] >= 0.8, localization["by_trait"]


@pytest.mark.slow
def test_no_rank_regresses_below_what_was_measured(demo_results):
    # Stricter than the 0.90: chance is 0.50 / 0.25 / 0.08, and on 2026-11-26 every
    # rank measured at least 0.981 (106/108) with the shipped backbone; species (0.991) varies
    # from 0.92 to 0.99 over seeds 0-3 (research/training.md).
    for rank in LEVELS:
        assert demo_results[rank]["eval"]["top1"] >= 0.95, rank


@pytest.mark.slow
def test_coarse_to_fine_specificity(demo_results):
    def hits(rank, trait):
        return demo_results[rank]["localization"]["by_trait"][trait]["pointing_game"]

    assert hits("species", "species") > hits("family", "species")
    assert hits("family", "family") > hits("species", "family")
