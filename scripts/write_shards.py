"""Snakemake adapter for rule write_shards: see promptcam.shards.write_shards."""

import logging
from pathlib import Path

from promptcam.shards import ShardConfig, write_shards


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        write_shards(
            snakemake.input.metadata,
            Path(snakemake.input.labels[0]).parent,
            snakemake.params.image_root,
            snakemake.output[0],
            snakemake.params.levels,
            ShardConfig(**snakemake.params.shards),
            workers=snakemake.threads,
        )
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("writing the shards failed")
        raise


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
