"""Evaluation metrics on hand-made cases, the linear probe, and evaluate_rank end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import SCALABLE, build_tiny_shards, sharpened_backbone, small_config

from promptcam.data.reader import load_manifest, split_size
from promptcam.evaluation.evaluate import (
    EvalConfig,
    classification_report,
    confusion_matrix,
    evaluate_rank,
    fit_rank_probe,
    per_class_accuracy,
)
from promptcam.evaluation.linear_probe import (
    FittedProbe,
    LinearProbeConfig,
    expected_calibration_error,
    fit_linear_probe,
    read_probe,
    write_probe,
)
from promptcam.evaluation.tables import read_confusion, write_confusion_tsv
from promptcam.training.runtime import topk_accuracy
from promptcam.training.train import train_rank

torch.set_num_threads(1)

# Five samples, three classes. Rows of scores, true labels, and what follows:
#   0: label 0, ranking 0 > 1 > 2   -> top-1 hit
#   1: label 0, ranking 1 > 0 > 2   -> top-1 miss (predicted 1), top-2 hit
#   2: label 1, ranking 2 > 0 > 1   -> top-1 miss (predicted 2), top-2 miss
#   3: label 1, ranking 1 > 2 > 0   -> top-1 hit
#   4: label 0, ranking 2 > 1 > 0   -> top-1 miss (predicted 2), top-2 miss
SCORES = torch.tensor(
    [
        [3.0, 2.0, 1.0],
        [2.0, 3.0, 1.0],
        [2.0, 1.0, 3.0],
        [1.0, 3.0, 2.0],
        [1.0, 2.0, 3.0],
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 0])
NAMES = ["Alpha", "Beta", "Gamma"]


def test_topk_accuracy_on_hand_made_case() -> None:
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(2 / 5)
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(3 / 5)
    # k beyond the number of classes is capped: every label is among all classes.
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0


def test_confusion_and_per_class_on_hand_made_case() -> None:
    confusion = confusion_matrix(SCORES.argmax(dim=1), LABELS, 3)
    expected = np.array(
        [
            [1, 1, 1],  # Alpha: right once, taken for Beta once, for Gamma once
            [0, 1, 1],  # Beta: right once, taken for Gamma once
            [0, 0, 0],  # Gamma: no test samples
        ]
    )
    np.testing.assert_array_equal(confusion, expected)
    accuracy = per_class_accuracy(confusion)
    np.testing.assert_allclose(accuracy[:2], [1 / 3, 1 / 2])
    assert np.isnan(accuracy[2])


def test_report_and_confusion_tsv(tmp_path: Path) -> None:
    report, confusion = classification_report(SCORES, LABELS, NAMES, top_k=5)
    assert report["top1"] == pytest.approx(0.4)
    assert (report["top5"], report["top5_k"]) == (1.0, 3)
    assert report["n_test"] == 5
    assert report["per_class"] == {
        "Alpha": {"n": 3, "top1": pytest.approx(1 / 3)},
        "Beta": {"n": 2, "top1": 0.5},
        "Gamma": {"n": 0, "top1": None},
    }
    json.dumps(report)  # JSON-safe: no NaN, no numpy scalars

    path = tmp_path / "confusion.tsv"
    write_confusion_tsv(path, confusion, NAMES)
    table = pd.read_csv(path, sep="\t", index_col=0)
    assert list(table.index) == NAMES and list(table.columns) == NAMES
    np.testing.assert_array_equal(table.to_numpy(), confusion)
    read_back = read_confusion(path)
    assert list(read_back.index) == NAMES and list(read_back.columns) == NAMES
    np.testing.assert_array_equal(read_back.to_numpy(), confusion)


def gaussian_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.array([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
    return centres[labels] + rng.normal(size=(n, 4)), labels


def test_linear_probe_selects_by_val_log_loss_and_reports_calibration() -> None:
    train, val, test = gaussian_blobs(60, 0), gaussian_blobs(30, 1), gaussian_blobs(30, 2)
    config = LinearProbeConfig(c_grid=(100.0, 1.0, 0.001))
    model, selected, grid = fit_linear_probe(train, val, config)
    assert [row["C"] for row in grid] == [0.001, 1.0, 100.0]
    assert selected["val_log_loss"] == min(row["val_log_loss"] for row in grid)
    # Well separated blobs: every C is right on val, but C = 0.001 is barely confident, so
    # top-1 with ties to the smaller C would have chosen it; log-loss does not.
    assert all(row["val_top1"] > 0.9 for row in grid)
    assert selected["C"] != 0.001
    assert grid[0]["val_true_class_probability"] < selected["val_true_class_probability"]
    assert np.mean(model.predict(test[0]) == test[1]) > 0.9
    for row in grid:
        assert 0 <= row["val_ece"] <= 1 and 0 < row["val_true_class_probability"] <= 1
        assert row["val_log_loss"] >= -np.log(row["val_true_class_probability"]) - 1e-12  # Jensen


def test_expected_calibration_error_on_hand_made_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    # Confidence 0.75 everywhere and right on 3 of 4: calibrated.
    calibrated = np.array([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.25]])
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0)
    # Confidence 0.9 and right on half: a gap of 0.4.
    over = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]])
    assert expected_calibration_error(over, labels) == pytest.approx(0.4)
    # Two bins: 0.6 right (gap 0.4), 1.0 wrong (gap 1.0), each half of the samples.
    two = np.array([[0.6, 0.4], [0.0, 1.0], [0.4, 0.6], [1.0, 0.0]])
    assert expected_calibration_error(two, labels) == pytest.approx(0.7)


def test_linear_probe_needs_two_classes() -> None:
    features = np.zeros((4, 2))
    with pytest.raises(ValueError, match="two classes"):
        fit_linear_probe((features, np.zeros(4)), (features, np.zeros(4)), LinearProbeConfig())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("evaluate")
    data = build_tiny_shards(root)
    data.backbone = sharpened_backbone(root / "backbone.pt")
    data.checkpoint = train_rank(
        shards_dir=data.shards,
        rank="genus",
        labels_tsv=data.labels / "genus.tsv",
        backbone=data.backbone,
        model_config=SCALABLE,
        train_config=small_config(epochs=4),
        out_dir=root / "genus",
    )
    return data


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_evaluate_rank_writes_consistent_outputs(
    trained: SimpleNamespace, tmp_path: Path, pool: str
) -> None:
    config = EvalConfig(batch_size=5, linear_probe=LinearProbeConfig(pool=pool, c_grid=(0.1, 1.0)))
    out_json, out_confusion = tmp_path / "eval.json", tmp_path / "confusion.tsv"
    probe_file = tmp_path / "linear_probe.npz"
    fitted = fit_rank_probe(
        shards_dir=trained.shards,
        rank="genus",
        checkpoint=trained.checkpoint,
        out_probe=probe_file,
        config=config,
    )
    report = evaluate_rank(
        shards_dir=trained.shards,
        rank="genus",
        checkpoint=trained.checkpoint,
        probe=probe_file,
        out_json=out_json,
        out_confusion=out_confusion,
        config=config,
        labels_tsv=trained.labels / "genus.tsv",
    )
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(report))
    # Among the true class's siblings (the parent given) an image is right at least as often.
    assert report["objective"] == "flat"
    assert report["top1"] <= report["within_siblings_top1"] <= 1.0
    manifest = load_manifest(trained.shards)
    assert report["n_test"] == split_size(manifest, "test")
    confusion = pd.read_csv(out_confusion, sep="\t", index_col=0)
    names = list(confusion.index)
    assert names == list(report["per_class"]) and len(names) == 4
    assert confusion.to_numpy().sum() == report["n_test"]
    assert report["top1"] == pytest.approx(np.trace(confusion.to_numpy()) / report["n_test"])
    assert report["top1"] <= report["top5"] == 1.0  # 4 classes: top-5 is capped at top-4
    for name in names:
        row = confusion.loc[name]
        assert report["per_class"][name]["n"] == row.sum()
        assert report["per_class"][name]["top1"] == pytest.approx(row[name] / row.sum())
    assert 0.0 <= report["linear_probe_top1"] <= 1.0
    assert report["linear_probe"]["pool"] == pool
    probe = report["linear_probe"]
    assert probe["selected_by"] == "val_log_loss"
    assert probe["val_log_loss"] == min(row["val_log_loss"] for row in probe["grid"])
    for split in ("train", "val", "test"):
        assert 0 <= probe[f"{split}_ece"] <= 1, split
        assert 0 < probe[f"{split}_true_class_probability"] <= 1, split
        assert probe[f"{split}_log_loss"] > 0, split
    assert probe["test_top1"] == report["linear_probe_top1"]
    assert (
        probe["selected_C"] == fitted.report["selected_C"]
        and probe["grid"] == fitted.report["grid"]
    )
    assert report["interpretability_cost"] == pytest.approx(
        report["linear_probe_top1"] - report["top1"]
    )
    assert report["checkpoint"]["selected_on"] == "val_top1"


def test_a_written_probe_predicts_what_the_fitted_one_does(tmp_path: Path) -> None:
    """linear_probe.npz holds no pickle and rebuilds the fitted pipeline: the same
    probabilities to the last bit, for a multi-class and a binary probe."""
    generator = np.random.default_rng(0)
    for classes in (3, 2):
        features = generator.normal(size=(60, 5)) * [1, 2, 3, 4, 5] + 7
        labels = np.arange(60) % classes
        features[:, 0] += labels
        pipeline, selected, _ = fit_linear_probe(
            (features, labels), (features, labels), LinearProbeConfig(c_grid=(0.5,))
        )
        path = tmp_path / f"probe{classes}.npz"
        write_probe(path, FittedProbe(pipeline, {"pool": "cls", "C": selected["C"]}))
        with np.load(path, allow_pickle=False) as data:
            assert "coef" in data.files
        read = read_probe(path)
        assert read.report == {"pool": "cls", "C": 0.5}
        np.testing.assert_array_equal(
            read.pipeline.predict_proba(features), pipeline.predict_proba(features)
        )
    np.savez(tmp_path / "other.npz", format=np.asarray("something else"))
    with pytest.raises(ValueError, match=r"not a linear probe.*rerun rule linear_probe"):
        read_probe(tmp_path / "other.npz")


def test_evaluate_refuses_the_probe_of_another_checkpoint(
    trained: SimpleNamespace, tmp_path: Path
) -> None:
    config = EvalConfig(batch_size=5, linear_probe=LinearProbeConfig(c_grid=(1.0,)))
    probe_file = tmp_path / "linear_probe.npz"
    fitted = fit_rank_probe(
        shards_dir=trained.shards,
        rank="genus",
        checkpoint=trained.checkpoint,
        out_probe=probe_file,
        config=config,
    )
    write_probe(
        probe_file, FittedProbe(fitted.pipeline, {**fitted.report, "checkpoint_sha256": "0"})
    )
    with pytest.raises(ValueError, match=r"another checkpoint.*rerun rule linear_probe"):
        evaluate_rank(
            shards_dir=trained.shards,
            rank="genus",
            checkpoint=trained.checkpoint,
            probe=probe_file,
            out_json=tmp_path / "eval.json",
            out_confusion=tmp_path / "confusion.tsv",
            config=config,
        )
    assert not (tmp_path / "eval.json").exists()
