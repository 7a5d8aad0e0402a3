"""Snakemake adapter for rule prepare_metadata: see promptcam.metadata.prepare_metadata."""

import logging
from pathlib import Path

from promptcam.metadata import MetadataSpec, prepare_metadata
from promptcam.splits import SplitConfig


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    params = snakemake.params
    try:
        prepare_metadata(
            snakemake.input.table,
            params.image_root,
            Path(snakemake.output.metadata).parent,
            MetadataSpec(
                levels=tuple(params.levels),
                image_column=params.image_column,
                split_column=params.split_column,
                mask_column=params.mask_column,
            ),
            SplitConfig(**params.splits),
            workers=snakemake.threads,
        )
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("preparing the metadata failed")
        raise


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
