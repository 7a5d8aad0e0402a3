"""``promptcam explain`` on real photos with the tiny run's checkpoints (one per rank), and
``promptcam predict``'s streamed top-k output: what a new user gets for their own pictures."""

from __future__ import annotations

import csv
import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from figure_checks import pdf_page_mm
from PIL import Image

from promptcam.cli import main
from promptcam.data.samples import iter_samples
from promptcam.data.taxonomy import lineage, load_taxonomy
from promptcam.explain import COARSE_TO_FINE_DIR, TSV_COLUMNS, figure_names
from promptcam.figures.style import FigureStyle
from promptcam.model.checkpoint import CheckpointMeta, load_checkpoint
from promptcam.model.predict import load_image
from promptcam.model.prompt_cam import PromptCAM
from promptcam.traits.run import traits_for_images
from promptcam.traits.search import GreedyConfig

RANKS = ("family", "genus", "species")


@pytest.fixture(scope="module")
def run(tiny_pipeline) -> Path:
    return tiny_pipeline.workdir / "results"


@pytest.fixture(scope="module")
def photos(run, tmp_path_factory) -> Path:
    """Two test images of the tiny run as files a user might have: a JPEG, and a PNG in a
    subfolder with a space in its name (two: drawing dominates the test's time)."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "field trip").mkdir()
    paths = ["b.jpg", "field trip/c.png"]
    samples = iter_samples(run / "shards", "test")
    for path, sample in zip(paths, samples, strict=False):
        Image.fromarray(sample.image).save(folder / path, quality=95)
    assert all((folder / p).is_file() for p in paths)
    return folder


def checkpoint(run: Path, rank: str) -> Path:
    return run / rank / "model.pt"


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def assert_real_figure(stem: Path, width_mm: float, dpi: int) -> None:
    """PDF with TrueType fonts only, page as wide as the column; a PNG that shows something."""
    pdf, png = stem.with_suffix(".pdf"), stem.with_suffix(".png")
    assert pdf.is_file() and png.is_file(), stem
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True)
    assert "Type 3" not in fonts.stdout and "TrueType" in fonts.stdout, fonts.stdout
    assert abs(pdf_page_mm(pdf)[0] - width_mm) < 0.5
    with Image.open(png) as picture:
        assert abs(picture.width - width_mm / 25.4 * dpi) <= 2
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels.mean(axis=2) < 200).mean() > 0.05


@functools.cache
def loaded(ckpt: Path) -> tuple[PromptCAM, CheckpointMeta]:
    return load_checkpoint(ckpt)


def model_prediction(ckpt: Path, image: Path) -> tuple[int, float]:
    """The model's own argmax and probability on one photo."""
    model, meta = loaded(ckpt)
    with torch.inference_mode():
        scores = model(load_image(image, meta.preprocessing)[None]).float()[0]
    index = int(scores.argmax())
    return index, float(scores.softmax(-1)[index])


def test_explain_per_rank_and_coarse_to_fine(run, photos, tmp_path, capsys):
    out = tmp_path / "explained"
    # Fine to coarse on purpose: explain orders them by rank.
    checkpoints = [str(checkpoint(run, rank)) for rank in reversed(RANKS)]
    taxonomy = run / "data" / "taxonomy.nwk"
    args = ["explain", *checkpoints, str(photos), "--out", str(out), "--batch-size", "1"]
    assert main([*args, "--taxonomy", str(taxonomy), "--device", "cpu"]) == 0
    assert f"wrote {out / 'explain.tsv'}" in capsys.readouterr().out

    rows = read_tsv(out / "explain.tsv")
    assert list(rows[0]) == list(TSV_COLUMNS)
    names = ["b.jpg", "field trip/c.png"]
    assert [(r["image"], r["rank"]) for r in rows] == [(n, r) for n in names for r in RANKS]
    tree = load_taxonomy(taxonomy)
    stems = figure_names(names)
    assert stems["field trip/c.png"] == "field_trip__c_png"
    style = FigureStyle()
    for name in names:
        path = [r for r in rows if r["image"] == name]
        for row in path:
            ckpt = checkpoint(run, row["rank"])
            index, probability = model_prediction(ckpt, photos / name)
            assert int(row["predicted_index"]) == index
            assert row["predicted"] == loaded(ckpt)[1].label_names[index]
            assert float(row["probability"]) == pytest.approx(probability, rel=1e-4)
            assert len(row["kept_heads"].split(",")) == 4  # the schema's top_traits
            assert_real_figure(out / row["rank"] / stems[name], style.width_mm(2), style.dpi)
        lineages = lineage(tree, "species", path[2]["predicted"])
        consistent = lineages["genus"] == path[1]["predicted"] and (
            lineage(tree, "genus", path[1]["predicted"])["family"] == path[0]["predicted"]
        )
        assert {r["consistent_path"] for r in path} == {"yes" if consistent else "no"}
        assert_real_figure(out / COARSE_TO_FINE_DIR / stems[name], style.width_mm(2), style.dpi)

    # The kept heads are exactly what `promptcam traits` keeps for the predicted class.
    table = traits_for_images(
        checkpoint(run, "genus"), photos, tmp_path / "t.parquet", GreedyConfig(), device="cpu"
    )
    for name in names:
        kept = table[(table["image"] == name) & table["kept"]].sort_values("kept_rank")
        (row,) = [r for r in rows if r["image"] == name and r["rank"] == "genus"]
        assert row["kept_heads"] == ",".join(str(h) for h in kept["head"])


def test_one_checkpoint_one_photo_single_column(run, photos, tmp_path):
    out = tmp_path / "one"
    args = ["explain", str(checkpoint(run, "species")), str(photos / "b.jpg"), "--out", str(out)]
    assert main([*args, "--columns", "1", "--dpi", "400", "--top-traits", "2"]) == 0
    (row,) = read_tsv(out / "explain.tsv")
    assert row["image"] == "b.jpg" and row["consistent_path"] == ""
    assert len(row["kept_heads"].split(",")) == 2
    assert_real_figure(out / "species" / "b_jpg", FigureStyle().width_mm(1), 400)
    assert not (out / COARSE_TO_FINE_DIR).exists()


def bad_inputs(run: Path, photos: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    notes = tmp / "notes.txt"
    notes.write_text("not an image")
    empty = tmp / "empty"
    empty.mkdir()
    copy = tmp / "copy" / "model.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoint(run, "genus"), copy)
    genus = str(checkpoint(run, "genus"))
    return {
        "missing checkpoint": (
            [str(tmp / "nope.pt"), str(photos)],
            f"no file {tmp / 'nope.pt'} (expected a Prompt-CAM checkpoint)",
        ),
        "not an image": ([genus, str(notes)], f"{notes} is not an image file (expected one of"),
        "empty folder": ([genus, str(empty)], "no images (.bmp, "),
        "same rank twice": (
            [genus, str(copy), str(photos)],
            f"{genus} and {copy} are both of rank 'genus': give one checkpoint per rank",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing checkpoint", "not an image", "empty folder", "same rank twice"]
)
def test_bad_input_is_one_clear_line(case, run, photos, tmp_path, capsys):
    args, expected = bad_inputs(run, photos, tmp_path)[case]
    out = tmp_path / "out"
    assert main(["explain", *args, "--out", str(out), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("promptcam explain: error: "), lines
    assert expected in lines[0], lines
    assert not (out / "explain.tsv").exists()


def test_figure_names_never_collide():
    stems = figure_names(["a b.png", "a_b.png", "x/y.png", "x__y.png", "c.png"])
    assert len(set(stems.values())) == 5
    assert stems["c.png"] == "c_png"


def test_predict_top_k_maps_are_the_all_classes_maps_of_those_classes(run, photos, tmp_path):
    ckpt = str(checkpoint(run, "species"))  # 8 classes
    top, every = tmp_path / "top.npz", tmp_path / "all.npz"
    common = ["--device", "cpu"]
    assert main(["predict", ckpt, str(photos), "--out", str(top), "--top-k", "3", "--batch-size", "1", *common]) == 0  # fmt: skip
    assert main(["predict", ckpt, str(photos), "--out", str(every), "--all-classes", *common]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npz", "top.npz"]  # no parts left
    with np.load(top) as kept, np.load(every) as full:
        assert "attention_classes" not in full
        assert full["attention"].shape[:3] == (2, 8, 8)
        assert kept["attention"].shape == (2, 8, 3, full["attention"].shape[3])
        np.testing.assert_allclose(kept["scores"], full["scores"], rtol=1e-5, atol=1e-5)
        classes = kept["attention_classes"]
        for image, scores in enumerate(full["scores"]):
            assert set(classes[image]) == set(np.argsort(-scores)[:3])
            assert list(classes[image]) == sorted(classes[image])
            assert kept["predicted_index"][image] in classes[image]
            np.testing.assert_allclose(
                kept["attention"][image], full["attention"][image][:, classes[image]], atol=1e-3
            )
        for key in ("predicted_index", "predicted", "image_names", "label_names", "patch_grid"):
            np.testing.assert_array_equal(kept[key], full[key])
