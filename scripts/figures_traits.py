"""Snakemake adapter for the per-rank trait figures (rules trait_panels, trait_gallery,
cross_class_figure): see promptcam.figures.panels, .gallery and .cross_class."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.figures.cross_class import draw_cross_class
from promptcam.figures.gallery import draw_gallery
from promptcam.figures.panels import draw_trait_panels
from promptcam.figures.settings import CrossClassSettings, GallerySettings, PanelSettings
from promptcam.figures.sources import shard_images
from promptcam.figures.style import FigureStyle
from promptcam.joblog import job_log


def main() -> None:
    rule, rank = snakemake.rule, snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"{rule} {rank}") as log:
        style = settings_from_config(FigureStyle, snakemake.params.style, "figures.style")
        images = shard_images(snakemake.input.shards, snakemake.params.levels)
        if rule == "cross_class_figure":
            written = draw_cross_class(
                cross_class_tsv=Path(snakemake.input.table),
                cross_class_npz=Path(snakemake.input.maps),
                images=images,
                rank=rank,
                out_stem=Path(snakemake.output.pdf).with_suffix(""),
                style=style,
                settings=settings_from_config(
                    CrossClassSettings, snakemake.params.settings, "figures.cross_class"
                ),
            )
        else:
            draw, settings_class, section = {
                "trait_panels": (draw_trait_panels, PanelSettings, "figures.panels"),
                "trait_gallery": (draw_gallery, GallerySettings, "figures.gallery"),
            }[rule]
            written = draw(
                traits_table=Path(snakemake.input.table),
                trait_maps=Path(snakemake.input.maps),
                images=images,
                rank=rank,
                out_dir=Path(snakemake.output[0]),
                style=style,
                settings=settings_from_config(settings_class, snakemake.params.settings, section),
            )
        log.info("wrote %d files", len(written))


if __name__ == "__main__":
    main()
