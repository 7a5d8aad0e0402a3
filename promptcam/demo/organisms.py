"""The bundled demo: synthetic "fish" whose family, genus and species differ by known traits.

Every rank is told apart by a trait of its own at a known body part, large for coarse ranks
and small for fine ones:

- family: the tail fin's shape (forked, rounded, truncate, pointed, lunate);
- genus: the dorsal fin's shape (triangle, dome, long-low, twin spikes, sail, comb);
- species: a marking on the flank, by its place along the body (front, middle, rear) and its
  shape (disc, ring, bar, twin dots), upper or lower half when more species are needed.

By default each trait variant belongs to exactly one taxon at its rank, so the trait alone
identifies the taxon (and, as in nature, its parent taxa too). With ``shared_traits`` every
family reuses the same dorsal fins and every genus the same markings, so a trait tells apart
only the taxa that share a parent and never identifies a coarser taxon: the family is told by
the tail alone, while a genus needs its family's tail and its own fin. Either way a
ground-truth mask tells where each rank's evidence is. Colours are drawn per image
from the same palette for every class: global colour statistics cannot classify.
Organisms appear at random positions, scales, rotations and flips on cluttered backgrounds
with distractor objects.
"""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image

from promptcam.data.masks import DEMO_LEVELS
from promptcam.demo.drawing import render_organism
from promptcam.demo.taxa import DemoConfig, OrganismSpec, build_taxonomy
from promptcam.io import atomic_open, atomic_path


def _sample_seed(seed: int, species_index: int, replicate: int) -> np.random.SeedSequence:
    # One independent stream per image: output does not depend on the worker count.
    return np.random.SeedSequence([seed, species_index, replicate])


def _render_one(job: tuple[Path, str, OrganismSpec, int, np.random.SeedSequence]) -> None:
    out_dir, sample_id, spec, size, seed_seq = job
    rendering = render_organism(spec, size, np.random.default_rng(seed_seq))
    with atomic_path(out_dir / "images" / f"{sample_id}.png") as tmp:
        Image.fromarray(rendering.image, "RGB").save(tmp, format="PNG")
    with atomic_path(out_dir / "masks" / f"{sample_id}.png") as tmp:
        Image.fromarray(rendering.trait_mask, "L").save(tmp, format="PNG")


def generate_demo_dataset(out_dir: str | Path, config: DemoConfig, workers: int = 1) -> Path:
    """Write the demo images, trait masks and ``metadata.csv``; return the CSV's path.

    The trait mask of each image is a bitmask: bit i is set inside the trait of rank
    ``DEMO_LEVELS[i]``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    taxa = build_taxonomy(config)
    jobs = []
    rows = []
    for species_index, taxon in enumerate(taxa):
        for replicate in range(config.images_per_species):
            sample_id = f"sp{species_index:03d}_{replicate:05d}"
            jobs.append(
                (
                    out,
                    sample_id,
                    taxon.spec,
                    config.image_size,
                    _sample_seed(config.seed, species_index, replicate),
                )
            )
            rows.append(
                {
                    "image": f"images/{sample_id}.png",
                    "family": taxon.family,
                    "genus": taxon.genus,
                    "species": taxon.species,
                    "mask": f"masks/{sample_id}.png",
                }
            )
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_render_one, jobs, chunksize=16)
    else:
        for job in jobs:
            _render_one(job)
    metadata = out / "metadata.csv"
    with atomic_open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", *DEMO_LEVELS, "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return metadata
