"""Snakemake adapter for rule traits: see promptcam.traits.run.run_rank_traits."""

from promptcam.config import runtime_settings, settings_from_config
from promptcam.joblog import job_log
from promptcam.traits.cross_class import siblings_from_taxonomy
from promptcam.traits.run import TraitRunConfig, run_rank_traits


def main() -> None:
    rank = snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"traits {rank}"):
        # Runtime keys are read from the config, not params, so changing them reruns nothing.
        runtime = {**runtime_settings(snakemake.config, "traits"), "threads": snakemake.threads}
        config = settings_from_config(
            TraitRunConfig, {**snakemake.params.settings, **runtime}, "traits"
        )
        siblings = (
            siblings_from_taxonomy(snakemake.input.taxonomy, rank) if config.siblings else None
        )
        run_rank_traits(
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            rank=rank,
            outputs=dict(snakemake.output.items()),
            config=config,
            siblings=siblings,
            labels_tsv=snakemake.input.labels,
        )


if __name__ == "__main__":
    main()
