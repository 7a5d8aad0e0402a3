"""Snakemake adapter for the figures across ranks (rules coarse_to_fine, tree_overview): see
promptcam.figures.coarse_to_fine and promptcam.figures.tree."""

import os

# ete3 renders through Qt: without a display it aborts the process unless Qt is offscreen.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.figures.coarse_to_fine import draw_coarse_to_fine
from promptcam.figures.settings import CoarseToFineSettings, TreeSettings
from promptcam.figures.sources import shard_images
from promptcam.figures.style import FigureStyle
from promptcam.figures.tree import draw_tree_overview
from promptcam.joblog import job_log


def main() -> None:
    rule = snakemake.rule
    levels = list(snakemake.params.levels)
    with job_log(snakemake.log[0], rule) as log:
        style = settings_from_config(FigureStyle, snakemake.params.style, "figures.style")
        inputs = {
            "levels": levels,
            "traits_tables": dict(zip(levels, map(Path, snakemake.input.tables), strict=True)),
            "trait_maps": dict(zip(levels, map(Path, snakemake.input.maps), strict=True)),
            "taxonomy": Path(snakemake.input.taxonomy),
            "images": shard_images(snakemake.input.shards, levels),
            "style": style,
        }
        if rule == "coarse_to_fine":
            settings = settings_from_config(
                CoarseToFineSettings, snakemake.params.settings, "figures.coarse_to_fine"
            )
            written = draw_coarse_to_fine(
                **inputs, out_dir=Path(snakemake.output[0]), settings=settings
            )
        else:
            settings = settings_from_config(TreeSettings, snakemake.params.settings, "figures.tree")
            written = draw_tree_overview(
                **inputs, out_dir=Path(snakemake.output.pdf[0]).parent, settings=settings
            )
        log.info("wrote %d files", len(written))


if __name__ == "__main__":
    main()
