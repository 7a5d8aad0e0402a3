"""The demo generator: deterministic, traits where they should be, not colour-separable."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from promptcam.data.masks import DEMO_LEVELS, decode_trait_mask
from promptcam.demo.drawing import render_organism
from promptcam.demo.organisms import generate_demo_dataset
from promptcam.demo.taxa import (
    BODY,
    DORSAL,
    HEAD,
    MARKING,
    PART_NAMES,
    TAIL,
    DemoConfig,
    OrganismSpec,
    build_taxonomy,
    random_spec,
)


def _digest_tree(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_generator_is_deterministic_and_seed_dependent(tmp_path):
    config = DemoConfig(
        n_families=2, genera_per_family=1, species_per_genus=2, images_per_species=3, image_size=48
    )
    generate_demo_dataset(tmp_path / "a", config, workers=1)
    generate_demo_dataset(tmp_path / "b", config, workers=2)
    generate_demo_dataset(tmp_path / "c", DemoConfig(**{**config.__dict__, "seed": 1}), workers=1)
    assert _digest_tree(tmp_path / "a") == _digest_tree(tmp_path / "b")
    assert _digest_tree(tmp_path / "a") != _digest_tree(tmp_path / "c")


def test_metadata_lists_every_image_with_all_ranks(tmp_path):
    config = DemoConfig(images_per_species=2, image_size=48)
    table = pd.read_csv(generate_demo_dataset(tmp_path, config))
    assert list(table.columns) == ["image", *DEMO_LEVELS, "mask"]
    assert len(table) == 12 * 2
    assert table.groupby("genus")["family"].nunique().max() == 1
    assert table.groupby("species")["genus"].nunique().max() == 1
    assert table["species"].nunique() == 12
    for row in table.itertuples():
        image = Image.open(tmp_path / row.image)
        assert image.mode == "RGB" and image.size == (48, 48)
        assert Image.open(tmp_path / row.mask).size == (48, 48)


def test_taxonomy_gives_each_taxon_its_own_trait_variant():
    taxa = build_taxonomy(DemoConfig(n_families=3, genera_per_family=2, species_per_genus=4))
    assert len({t.spec.tail for t in taxa}) == 3
    assert len({t.spec.dorsal for t in taxa}) == 6
    assert len({(t.spec.mark_place, t.spec.mark_shape, t.spec.mark_side) for t in taxa}) == 24
    with pytest.raises(ValueError, match="at most"):
        build_taxonomy(DemoConfig(n_families=9))


@pytest.mark.parametrize("seed", range(5))
def test_trait_masks_match_the_body_parts(seed):
    rng = np.random.default_rng(seed)
    rendering = render_organism(random_spec(rng), 96, rng)
    masks = decode_trait_mask(rendering.trait_mask)
    for level, part in zip(DEMO_LEVELS, (TAIL, DORSAL, MARKING), strict=True):
        assert masks[level].any(), level
        assert np.array_equal(masks[level], rendering.parts == part)
    # Coarse ranks have the larger traits.
    assert masks["family"].sum() > masks["species"].sum()


def test_colour_histograms_cannot_classify_species(tmp_path):
    from sklearn.linear_model import LogisticRegression

    config = DemoConfig(images_per_species=30, image_size=64, seed=3)
    table = pd.read_csv(generate_demo_dataset(tmp_path, config, workers=2))
    features = []
    for row in table.itertuples():
        pixels = (
            np.asarray(Image.open(tmp_path / row.image)).reshape(-1, 3) // 32
        )  # 8 bins per channel
        codes = pixels[:, 0] * 64 + pixels[:, 1] * 8 + pixels[:, 2]
        features.append(np.bincount(codes, minlength=512) / len(codes))
    x = np.array(features)
    y = table["species"].to_numpy()
    train = np.arange(len(table)) % 3 != 0
    classifier = LogisticRegression(max_iter=3000).fit(x[train], y[train])
    accuracy = (classifier.predict(x[~train]) == y[~train]).mean()
    chance = 1 / table["species"].nunique()
    assert accuracy < 0.5, f"colour histograms reach {accuracy:.2f} top-1 (chance {chance:.2f})"


def test_canonical_part_map_is_pose_free_and_leaves_the_image_unchanged():
    spec = OrganismSpec(tail="forked", dorsal="comb", mark_place="rear", mark_shape="ring")
    grid = (30, 40)
    maps = []
    for seed in range(4):  # four poses (angle, flip, position, size) of the same organism
        plain = render_organism(spec, 96, np.random.default_rng(seed))
        rendering = render_organism(spec, 96, np.random.default_rng(seed), canonical_grid=grid)
        assert np.array_equal(plain.image, rendering.image) and plain.canonical_parts is None
        shares = rendering.canonical_parts
        assert shares.shape == (*grid, len(PART_NAMES))
        assert np.allclose(shares.sum(-1), 1.0)
        maps.append(shares.argmax(-1))
    # Only body depth and marking size vary between individuals: the maps nearly agree.
    for other in maps[1:]:
        assert (other == maps[0]).mean() > 0.95
    # Head towards +x (right), tail to the left, dorsal fin above the body.
    head_cols = np.nonzero((maps[0] == HEAD).any(0))[0]
    tail_cols = np.nonzero((maps[0] == TAIL).any(0))[0]
    assert head_cols.min() > tail_cols.max()
    dorsal_rows = np.nonzero((maps[0] == DORSAL).any(1))[0]
    body_rows = np.nonzero((maps[0] == BODY).any(1))[0]
    assert dorsal_rows.min() < body_rows.min()


def test_canonical_part_map_separates_shapes_the_image_shows():
    grid = (30, 40)
    by_tail = {}
    for tail in ("forked", "rounded"):
        spec = OrganismSpec(tail=tail, dorsal="dome", mark_place="front", mark_shape="disc")
        rendering = render_organism(spec, 96, np.random.default_rng(0), canonical_grid=grid)
        by_tail[tail] = rendering.canonical_parts[..., TAIL]
    assert np.abs(by_tail["forked"] - by_tail["rounded"]).sum() > 10  # cells' worth of area


def test_shared_traits_reuse_fins_and_markings_under_every_parent():
    config = DemoConfig(n_families=3, genera_per_family=4, species_per_genus=5, shared_traits=True)
    taxa = build_taxonomy(config)
    assert len({t.species for t in taxa}) == 60 and len({t.genus for t in taxa}) == 12

    def marking(taxon):
        return taxon.spec.mark_place, taxon.spec.mark_shape, taxon.spec.mark_side

    for family in {t.family for t in taxa}:
        members = [t for t in taxa if t.family == family]
        # The same four fins in every family, one per genus.
        assert sorted({t.spec.dorsal for t in members}) == sorted({t.spec.dorsal for t in taxa})
        assert len({t.spec.dorsal for t in members}) == 4
    for genus in {t.genus for t in taxa}:
        members = [t for t in taxa if t.genus == genus]
        assert len({marking(t) for t in members}) == 5
    # A fin or a marking alone never tells the family: each occurs in every family.
    for trait in (lambda t: t.spec.dorsal, marking):
        families_with = {}
        for taxon in taxa:
            families_with.setdefault(trait(taxon), set()).add(taxon.family)
        assert all(len(families) == 3 for families in families_with.values())
    # The limits count per parent: 6 fins per family, though 18 genera in all.
    assert (
        len(build_taxonomy(DemoConfig(n_families=3, genera_per_family=6, shared_traits=True))) == 54
    )
    with pytest.raises(ValueError, match="per parent"):
        build_taxonomy(DemoConfig(genera_per_family=7, shared_traits=True))
