"""Snakemake adapter for rule write_shards: see promptcam.data.shards.write_shards."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "writing the shards"):
        write_shards(
            snakemake.input.metadata,
            Path(snakemake.input.labels[0]).parent,
            snakemake.params.image_root,
            snakemake.output[0],
            snakemake.params.levels,
            settings_from_config(ShardConfig, snakemake.params.shards, "shards"),
            workers=snakemake.threads,
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
