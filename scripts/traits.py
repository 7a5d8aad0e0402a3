"""Snakemake adapter for rule traits: see promptcam.traits.run.run_rank_traits."""

from promptcam.joblog import job_log
from promptcam.traits.cross_class import siblings_from_taxonomy
from promptcam.traits.run import TraitRunConfig, run_rank_traits


def main() -> None:
    rank = snakemake.wildcards.rank
    with job_log(snakemake.log[0], "trait identification"):
        # Where it runs is read from the config, not params, so changing it reruns nothing.
        device = snakemake.config["traits"]["device"]
        settings = {**snakemake.params.settings, "threads": snakemake.threads, "device": device}
        config = TraitRunConfig.from_dict(settings, rank)
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
        )


if __name__ == "__main__":
    main()
