"""The demo's taxonomy: which trait variant names each family, genus and species.

The trait vocabularies (tail, dorsal-fin and marking shapes), the body parts of the part map,
the taxon names built from the traits, and :func:`build_taxonomy`, which gives every taxon its
trait variant at each rank (see :mod:`promptcam.demo.organisms` for the demo as a whole and
:mod:`promptcam.demo.drawing` for how an organism is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAIL_SHAPES: tuple[str, ...] = ("forked", "rounded", "truncate", "pointed", "lunate")

DORSAL_SHAPES: tuple[str, ...] = ("triangle", "dome", "longlow", "twinspike", "sail", "comb")

MARK_PLACES: tuple[str, ...] = ("front", "middle", "rear")

MARK_SHAPES: tuple[str, ...] = ("disc", "ring", "bar", "twindot")

MARK_SIDES: tuple[str, ...] = ("centre", "upper")

# Names that say which trait defines each taxon, so figures read naturally.
_FAMILY_NAMES = {
    "forked": "Furcidae",
    "rounded": "Rotundidae",
    "truncate": "Truncidae",
    "pointed": "Acutidae",
    "lunate": "Lunatidae",
}

_GENUS_NAMES = {
    "triangle": "Trigonus",
    "dome": "Tholus",
    "longlow": "Longipinna",
    "twinspike": "Didymus",
    "sail": "Velifer",
    "comb": "Pectinus",
}

_PLACE_PREFIX = {"front": "antero", "middle": "medio", "rear": "postero"}

_SHAPE_SUFFIX = {
    "disc": "punctatus",
    "ring": "annulatus",
    "bar": "fasciatus",
    "twindot": "bipunctatus",
}

# Body parts of the part map (dense, label-free geometry used for backbone pre-training).
PART_NAMES: tuple[str, ...] = (
    "background",
    "body",
    "tail",
    "dorsal_fin",
    "head",
    "marking",
    "pelvic_fin",
)

BACKGROUND, BODY, TAIL, DORSAL, HEAD, MARKING, PELVIC = range(len(PART_NAMES))

# The body part that shows each rank's trait, in DEMO_LEVELS order (the trait mask's bits).
RANK_TRAIT_PARTS: dict[str, int] = {"family": TAIL, "genus": DORSAL, "species": MARKING}


@dataclass(frozen=True)
class DemoConfig:
    """The config's ``demo`` section (less ``threads``); defaults as in the schema."""

    n_families: int = 2
    genera_per_family: int = 2
    species_per_genus: int = 3
    images_per_species: int = 60
    image_size: int = 96
    seed: int = 0
    shared_traits: bool = False


@dataclass(frozen=True)
class OrganismSpec:
    """Which trait variant the organism carries at each rank."""

    tail: str
    dorsal: str
    mark_place: str
    mark_shape: str
    mark_side: str = "centre"


@dataclass(frozen=True)
class Taxon:
    family: str
    genus: str
    species: str
    spec: OrganismSpec


def _genus_name(dorsal: str, tail: str, shared_traits: bool) -> str:
    """A genus named after its fin; with shared fins, prefixed by its family's stem."""
    name = _GENUS_NAMES[dorsal]
    if not shared_traits:
        return name
    return _FAMILY_NAMES[tail].removesuffix("idae") + "o" + name.lower()


def build_taxonomy(config: DemoConfig) -> list[Taxon]:
    """The demo taxonomy: one trait variant per taxon at every rank (see the module docstring
    for ``shared_traits``)."""
    n_genera = config.n_families * config.genera_per_family
    n_species = n_genera * config.species_per_genus
    n_marks = len(MARK_PLACES) * len(MARK_SHAPES) * len(MARK_SIDES)
    # With shared traits a variant only has to be unique among the taxa of one parent.
    fins_needed = config.genera_per_family if config.shared_traits else n_genera
    marks_needed = config.species_per_genus if config.shared_traits else n_species
    scope = "per parent" if config.shared_traits else "in all"
    if config.n_families > len(TAIL_SHAPES):
        raise ValueError(
            f"demo supports at most {len(TAIL_SHAPES)} families; got {config.n_families}"
        )
    if fins_needed > len(DORSAL_SHAPES):
        raise ValueError(
            f"demo supports at most {len(DORSAL_SHAPES)} genera {scope}; got {fins_needed}"
        )
    if marks_needed > n_marks:
        raise ValueError(f"demo supports at most {n_marks} species {scope}; got {marks_needed}")
    taxa = []
    for family_index in range(config.n_families):
        tail = TAIL_SHAPES[family_index]
        for genus_offset in range(config.genera_per_family):
            genus_index = family_index * config.genera_per_family + genus_offset
            dorsal = DORSAL_SHAPES[genus_offset if config.shared_traits else genus_index]
            genus_name = _genus_name(dorsal, tail, config.shared_traits)
            for species_offset in range(config.species_per_genus):
                species_index = genus_index * config.species_per_genus + species_offset
                mark_index = species_offset if config.shared_traits else species_index
                # Sister species differ by the marking's place first, as in many real keys.
                place = MARK_PLACES[mark_index % len(MARK_PLACES)]
                shape = MARK_SHAPES[(mark_index // len(MARK_PLACES)) % len(MARK_SHAPES)]
                side = MARK_SIDES[mark_index // (len(MARK_PLACES) * len(MARK_SHAPES))]
                epithet = _PLACE_PREFIX[place] + _SHAPE_SUFFIX[shape]
                if side != "centre":
                    epithet = "supra" + epithet
                taxa.append(
                    Taxon(
                        family=_FAMILY_NAMES[tail],
                        genus=genus_name,
                        species=f"{genus_name} {epithet}",
                        spec=OrganismSpec(tail, dorsal, place, shape, side),
                    )
                )
    return taxa


def random_spec(rng: np.random.Generator) -> OrganismSpec:
    """Any combination of trait variants: for label-free pre-training, unrelated to a taxonomy."""
    return OrganismSpec(
        tail=str(rng.choice(TAIL_SHAPES)),
        dorsal=str(rng.choice(DORSAL_SHAPES)),
        mark_place=str(rng.choice(MARK_PLACES)),
        mark_shape=str(rng.choice(MARK_SHAPES)),
        mark_side=str(rng.choice(MARK_SIDES)),
    )
