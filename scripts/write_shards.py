"""Snakemake adapter for rule write_shards: see promptcam.data.shards.write_shards_accounted."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.data.images import ImageSettings
from promptcam.data.shards import ShardConfig, write_shards_accounted
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "writing the shards"):
        write_shards_accounted(
            snakemake.input.metadata,
            Path(snakemake.input.labels[0]).parent,
            snakemake.params.image_root,
            snakemake.output.shards,
            snakemake.params.levels,
            settings_from_config(ShardConfig, snakemake.params.shards, "shards"),
            ingest_path=snakemake.input.ingest,
            counts_path=snakemake.output.counts,
            workers=snakemake.threads,
            images=ImageSettings.from_mapping(snakemake.params.images),
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
