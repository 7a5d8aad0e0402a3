"""Snakemake adapter for rule localization: see promptcam.evaluation.localization.run_rank_localization."""

import torch

from promptcam.evaluation.localization import run_rank_localization
from promptcam.joblog import job_log


def main() -> None:
    torch.set_num_threads(snakemake.threads)
    with job_log(snakemake.log[0], "localization"):
        run_rank_localization(
            trait_maps=snakemake.input.maps,
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            rank=snakemake.wildcards.rank,
            levels=snakemake.params.levels,
            out_json=snakemake.output.report,
            cam_maps=snakemake.input.cam_maps,
            out_tsv=snakemake.output.table,
            heads_tsv=snakemake.input.heads,
            min_coverage=snakemake.params.min_coverage,
        )


if __name__ == "__main__":
    main()
