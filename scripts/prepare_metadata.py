"""Snakemake adapter for rule prepare_metadata: see promptcam.data.metadata.prepare_metadata."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.data.metadata import IngestSettings, MetadataSpec, prepare_metadata
from promptcam.data.splits import SplitConfig
from promptcam.joblog import job_log


def main() -> None:
    params = snakemake.params
    with job_log(snakemake.log[0], "preparing the metadata"):
        prepare_metadata(
            params.table,
            params.image_root,
            Path(snakemake.output.metadata).parent,
            MetadataSpec(
                levels=tuple(params.levels),
                image_column=params.image_column,
                split_column=params.split_column,
                mask_column=params.mask_column,
            ),
            settings_from_config(SplitConfig, params.splits, "splits"),
            workers=snakemake.threads,
            settings=IngestSettings.from_mapping(params.ingest),
            provenance=params.dataset,
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
