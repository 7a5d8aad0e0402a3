"""Pointing game and energy in mask on hand-made maps and masks with known answers; the
localisation table of every method, with and without masks, on the tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from promptcam.evaluation.localization import (
    energy_in_mask,
    fit_fixed_place_prior,
    fixed_place_scores,
    localization_report,
    localization_rows,
    patch_coverage,
    peak_patch,
    pointing_hits,
    run_rank_localization,
)
from promptcam.evaluation.tables import (
    LOCALIZATION_TABLE_COLUMNS,
    read_localization_table,
    write_localization_table,
)
from promptcam.traits.tables import read_trait_maps


def mask_with(pixels: list[tuple[int, int]], size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for row, col in pixels:
        mask[row, col] = True
    return mask


def test_patch_coverage_is_the_share_of_each_patch_inside() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:4] = True  # the whole top-left patch
    mask[4:6, 4:8] = True  # half of the bottom-right patch
    mask[0, 7] = True  # one pixel of the top-right patch
    np.testing.assert_allclose(patch_coverage(mask, (2, 2)), [[1.0, 1 / 16], [0.0, 0.5]])
    stacked = patch_coverage(np.stack([mask, ~mask]), (2, 2))
    np.testing.assert_allclose(stacked[1], 1 - stacked[0])
    with pytest.raises(ValueError, match="tile"):
        patch_coverage(mask, (3, 3))


def test_peak_is_the_first_maximum_in_row_major_order() -> None:
    maps = np.array([[[0.1, 0.7], [0.7, 0.2]], [[0.0, 0.0], [0.0, 0.3]]])
    assert peak_patch(maps).tolist() == [1, 3]


def test_pointing_game_hits_any_pixel_by_default_and_respects_min_coverage() -> None:
    coverage = patch_coverage(mask_with([(0, 7)]), (2, 2))  # 1/16 of the top-right patch
    on_trait = np.array([[0.1, 0.9], [0.2, 0.3]])
    off_trait = np.array([[0.9, 0.1], [0.2, 0.3]])
    assert pointing_hits(on_trait, coverage).item()
    assert not pointing_hits(off_trait, coverage).item()
    assert not pointing_hits(on_trait, coverage, min_coverage=0.5).item()
    half = patch_coverage(np.pad(np.ones((2, 4), bool), ((0, 6), (4, 0))), (2, 2))
    assert pointing_hits(on_trait, half, min_coverage=0.5).item()


def test_energy_in_mask_is_the_upsampled_maps_share_inside() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:4] = True
    mask[4:6, 4:8] = True
    coverage = patch_coverage(mask, (2, 2))  # [[1, 0], [0, 0.5]]
    uniform = np.ones((2, 2))
    assert energy_in_mask(uniform, coverage) == pytest.approx(mask.mean())
    peaked = np.array([[0.0, 0.0], [0.0, 2.0]])
    assert energy_in_mask(peaked, coverage) == pytest.approx(0.5)
    mixed = np.array([[3.0, 1.0], [0.0, 0.0]])
    assert energy_in_mask(mixed, coverage) == pytest.approx(0.75)
    # Pixel-level check: nearest upsampling of the map, mass inside the mask.
    upsampled = np.kron(mixed, np.ones((4, 4)))
    assert energy_in_mask(mixed, coverage) == pytest.approx(upsampled[mask].sum() / upsampled.sum())


def test_report_scores_kept_heads_against_every_trait() -> None:
    # 2 images, 3 heads, 2x2 patch grid; traits: "tail" top-left patch, "fin" bottom-right.
    tail = np.zeros((2, 2, 2))
    tail[:, 0, 0] = 1.0
    fin = np.zeros((2, 2, 2))
    fin[:, 1, 1] = 1.0
    fin[1] = 0.0  # image 1 lacks the fin: left out for that trait
    maps = np.zeros((2, 3, 2, 2))
    maps[:, 0, 0, 0] = 1.0  # head 0 looks at the tail
    maps[:, 1, 1, 1] = 1.0  # head 1 at the fin
    maps[:, 2] = 0.25  # head 2 everywhere (peak: the first patch, the tail's)
    kept = np.array([[True, True, False], [True, False, True]])
    report = localization_report(maps, kept, {"tail": tail, "fin": fin}, rank="tail")

    # Own trait (tail): maps of image 0 heads 0, 1 and image 1 heads 0, 2 -> hits 1, 0, 1, 1.
    assert report["n_maps"] == 4 and report["n_images"] == 2
    assert report["pointing_game"] == pytest.approx(0.75)
    assert report["energy_in_mask"] == pytest.approx((1 + 0 + 1 + 0.25) / 4)
    assert report["pointing_game_chance"] == pytest.approx(0.25)
    assert report["energy_in_mask_chance"] == pytest.approx(0.25)
    # Fin: only image 0 has one; its kept heads 0 and 1 -> hits 0 and 1.
    fin_scores = report["by_trait"]["fin"]
    assert fin_scores["n_maps"] == 2 and fin_scores["n_images"] == 1
    assert fin_scores["pointing_game"] == pytest.approx(0.5)
    assert fin_scores["energy_in_mask"] == pytest.approx(0.5)
    # Mean of the kept maps: image 0 -> half tail, half fin (peak tail, first maximum).
    assert report["mean_map"]["tail"]["pointing_game"] == pytest.approx(1.0)
    assert report["mean_map"]["tail"]["energy_in_mask"] == pytest.approx((0.5 + 0.625) / 2)
    assert report["by_head"]["1"]["n_maps"] == 1
    assert report["by_head"]["1"]["pointing_game"] == pytest.approx(0.0)
    assert report["by_head"]["2"]["energy_in_mask"] == pytest.approx(0.25)


def test_report_needs_the_ranks_own_trait() -> None:
    with pytest.raises(KeyError):
        localization_report(
            np.zeros((1, 1, 2, 2)), np.ones((1, 1), bool), {"fin": np.ones((1, 2, 2))}, "tail"
        )


def test_report_without_maps_gives_nulls() -> None:
    report = localization_report(
        np.zeros((0, 3, 2, 2)), np.zeros((0, 3), bool), {"tail": np.zeros((0, 2, 2))}, "tail"
    )
    assert report["n_maps"] == 0 and report["pointing_game"] is None
    assert report["energy_in_mask"] is None


# ----------------------------------------------------------------------------- the table


def test_fixed_place_prior_learns_where_the_trait_usually_lies() -> None:
    # 2x2 grid: the trait lies in the top-right patch on 3 of 4 training images.
    train = np.zeros((5, 2, 2))
    train[:3, 0, 1] = 0.5
    train[3, 1, 0] = 1.0  # the highest mean coverage per image but on one image only
    train[3, 0, 1] = 0.1
    # image 4 lacks the trait: left out
    prior = fit_fixed_place_prior(train)
    assert prior.n_train_images == 4
    assert prior.pointing_patch == 1  # hit on 4 of 4 images
    assert prior.energy_patch == 1  # mean coverage 1.6 / 4 against 1.0 / 4
    test = np.zeros((2, 2, 2))
    test[0, 0, 1] = 0.25
    test[1, 1, 1] = 1.0
    assert fixed_place_scores(prior, test) == pytest.approx((0.5, 0.125))
    assert fit_fixed_place_prior(np.zeros((3, 2, 2))) is None
    assert fixed_place_scores(None, test) == (None, None)


def _table_inputs() -> dict:
    """3 images, 2 heads, 2x2 grid; the trait lies in the top-left patch (image 2 has none)."""
    coverage = np.zeros((3, 2, 2))
    coverage[:2, 0, 0] = 1.0
    maps = np.zeros((3, 2, 2, 2))
    maps[:, 0, 1, 1] = 1.0  # head 0 looks away from the trait
    maps[:, 1, 0, 0] = 1.0  # head 1 at it
    maps[1, 1] = [[0.2, 0.0], [0.0, 0.6]]  # except on image 1
    kept = np.array([[True, True], [True, False], [True, True]])
    order = np.array([[1, 0], [1, 0], [0, 1]])  # the last is the most important head
    return {"maps": maps, "kept": kept, "order": order, "coverage": coverage}


def test_rows_score_every_method_on_the_same_images() -> None:
    inputs = _table_inputs()
    baseline = np.zeros((3, 2, 2))
    baseline[:, 0, 0] = 1.0  # a perfect baseline
    prior = fit_fixed_place_prior(inputs["coverage"][:2])
    table = localization_rows(**inputs, baselines={("grad_cam", "linear_probe"): baseline},
                              prior=prior)  # fmt: skip
    rows = table.set_index("method")
    assert list(table.columns) == list(LOCALIZATION_TABLE_COLUMNS)
    assert rows.loc["prompt_cam_top_head", "pointing_game"] == pytest.approx(0.0)  # head 0
    # Mean of the kept maps: image 0 halves of heads 0 and 1 (peak: the trait's patch, the
    # first maximum); image 1 head 0 alone.
    assert rows.loc["prompt_cam_kept_heads", "pointing_game"] == pytest.approx(0.5)
    assert rows.loc["prompt_cam_kept_heads", "energy_in_mask"] == pytest.approx(0.25)
    pooled = rows.loc["prompt_cam_kept_heads_pooled"]
    assert pooled["n_maps"] == 3 and pooled["n_images"] == 2
    assert pooled["pointing_game"] == pytest.approx(1 / 3)
    fixed = rows.loc["prompt_cam_best_fixed_head"]
    assert fixed["fixed_head"] == 1 and fixed["fixed_head_chosen_on"] == "test"
    assert fixed["pointing_game"] == pytest.approx(0.5)  # image 1's head 1 peaks elsewhere
    assert fixed["energy_in_mask"] == pytest.approx((1 + 0.25) / 2)
    assert rows.loc["grad_cam", "model"] == "linear_probe"
    assert rows.loc["grad_cam", "pointing_game"] == pytest.approx(1.0)
    assert (table["n_images"] == [2, 2, 2, 2, 2, 2]).all()
    assert np.allclose(table["pointing_game_uniform_chance"], 0.25)
    assert np.allclose(table["pointing_game_fixed_place"], 1.0)
    assert np.allclose(table["energy_in_mask_fixed_place"], 1.0)
    given = localization_rows(**inputs, baselines={}, prior=prior, fixed_head=0)
    fixed = given.set_index("method").loc["prompt_cam_best_fixed_head"]
    assert fixed["fixed_head"] == 0 and fixed["fixed_head_chosen_on"] == "train"


def test_random_maps_point_at_the_uniform_chance_level() -> None:
    rng = np.random.default_rng(1)
    coverage = (rng.random((2000, 4, 4)) < 0.25).astype(float)
    coverage[:, 0, 0] = 1.0  # every image has the trait
    table = localization_rows(
        maps=np.ones((2000, 1, 4, 4)), kept=np.ones((2000, 1), bool),
        order=np.zeros((2000, 1), np.int64), coverage=coverage, baselines={}, prior=None,
    )  # fmt: skip
    random = table.set_index("method").loc["random"]
    assert random["model"] == "none"
    assert abs(random["pointing_game"] - random["pointing_game_uniform_chance"]) < 0.04
    assert abs(random["energy_in_mask"] - random["energy_in_mask_uniform_chance"]) < 0.02
    assert np.isnan(random["pointing_game_fixed_place"])


def test_table_round_trips_with_nulls(tmp_path) -> None:
    inputs = _table_inputs()
    empty = localization_rows(
        maps=inputs["maps"][:0], kept=inputs["kept"][:0], order=inputs["order"][:0],
        coverage=inputs["coverage"][:0], baselines={("layer_cam", "prompt_cam"): np.zeros((0, 2, 2))},
        prior=None,
    )  # fmt: skip
    path = tmp_path / "localization.tsv"
    write_localization_table(path, empty)
    read = read_localization_table(path)
    assert list(read["method"]) == list(empty["method"])
    assert (read["n_images"] == 0).all() and read["pointing_game"].isna().all()
    assert "NA" in path.read_text()


# ----------------------------------------------------------------------------- one rank


def _write_cam_maps(path, stored, methods: dict) -> None:
    """cam_maps.npz in the fidelity rule's format, from maps (N, h, w) per (method, model)."""
    keys = list(methods)
    np.savez_compressed(
        path,
        image=stored.image,
        method=np.array([k[0] for k in keys]),
        model=np.array([k[1] for k in keys]),
        maps=np.stack([methods[k] for k in keys], axis=1).astype(np.float32),
    )


@pytest.fixture(scope="module")
def tiny_rank(tiny_pipeline) -> dict:
    results = tiny_pipeline.workdir / "results"
    rank = "genus"
    return {
        "trait_maps": results / rank / "trait_maps.npz",
        "checkpoint": results / rank / "model.pt",
        "shards_dir": results / "shards",
        "rank": rank,
        "levels": ("family", "genus", "species"),
    }


def test_rank_localization_scores_every_method(tiny_rank, tmp_path) -> None:
    stored = read_trait_maps(tiny_rank["trait_maps"])
    all_maps = stored.read_maps(np.arange(len(stored.image)))
    cams = tmp_path / "cam_maps.npz"
    # The file's "layer_cam" is head 0's map: its row must equal head 0's own score.
    _write_cam_maps(cams, stored, {("layer_cam", "prompt_cam"): all_maps[:, 0],
                                   ("random", "linear_probe"): all_maps[:, 1]})  # fmt: skip
    table = run_rank_localization(
        **tiny_rank, out_json=tmp_path / "localization.json", cam_maps=cams,
        out_tsv=tmp_path / "localization.tsv",
    )  # fmt: skip
    read = read_localization_table(tmp_path / "localization.tsv")
    assert list(read["method"]) == [
        "prompt_cam_top_head", "prompt_cam_kept_heads", "prompt_cam_kept_heads_pooled",
        "prompt_cam_best_fixed_head", "layer_cam", "random",
    ]  # fmt: skip
    rows = table.set_index("method")
    searched = int(stored.searched.sum())
    assert 0 < rows.loc["layer_cam", "n_images"] <= searched
    for column in ("pointing_game", "energy_in_mask", "pointing_game_fixed_place",
                   "energy_in_mask_fixed_place", "pointing_game_uniform_chance"):  # fmt: skip
        assert read[column].between(0, 1).all(), column
    # The best fixed head (chosen on these images) is at least as good as every single head.
    assert (
        rows.loc["prompt_cam_best_fixed_head", "pointing_game"]
        >= rows.loc["layer_cam", "pointing_game"] - 1e-12
    )
    report = json.loads((tmp_path / "localization.json").read_text())
    assert report["has_masks"] is True and report["n_maps"] > 0


def test_rank_localization_without_masks_writes_empty_files(tiny_rank, tmp_path, caplog) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_rank["shards_dir"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "has_masks": False}))
    stored = read_trait_maps(tiny_rank["trait_maps"])
    cams = tmp_path / "cam_maps.npz"
    _write_cam_maps(
        cams,
        stored,
        {("grad_cam", "linear_probe"): np.zeros((len(stored.image), *stored.map_shape[-2:]))},
    )
    with caplog.at_level("WARNING"):
        run_rank_localization(
            **{**tiny_rank, "shards_dir": shards}, out_json=tmp_path / "localization.json",
            cam_maps=cams, out_tsv=tmp_path / "localization.tsv",
        )  # fmt: skip
    assert "no trait masks" in caplog.text
    table = read_localization_table(tmp_path / "localization.tsv")
    assert len(table) == 6 and (table["n_images"] == 0).all()
    assert table["pointing_game"].isna().all()
    report = json.loads((tmp_path / "localization.json").read_text())
    assert report["has_masks"] is False and report["n_images"] == 0
    assert report["pointing_game"] is None
