"""Pointing game and energy in mask on hand-made maps and masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from promptcam.evaluation.localization import (
    energy_in_mask,
    localization_report,
    patch_coverage,
    peak_patch,
    pointing_hits,
)


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
