"""Snakemake adapter for rule heads: see promptcam.evaluation.heads.run_rank_heads."""

from promptcam.config import runtime_settings, settings_from_config
from promptcam.evaluation.heads import HeadsConfig, run_rank_heads
from promptcam.joblog import job_log


def main() -> None:
    rank = snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"heads {rank}"):
        # Runtime keys are read from the config, not params, so changing them reruns nothing.
        runtime = {
            **runtime_settings(snakemake.config, "traits.heads"),
            "threads": snakemake.threads,
        }
        settings = {
            **snakemake.params.settings,
            **runtime,
            "min_coverage": snakemake.params.min_coverage,
        }
        run_rank_heads(
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            trait_maps=snakemake.input.maps,
            rank=rank,
            levels=snakemake.params.levels,
            out_tsv=snakemake.output[0],
            config=settings_from_config(HeadsConfig, settings, "traits.heads"),
        )


if __name__ == "__main__":
    main()
