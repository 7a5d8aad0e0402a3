"""Snakemake adapter for rule traits: see promptcam.traits.run_rank_traits."""

import logging

from promptcam.traits import TraitRunConfig, run_rank_traits, siblings_from_taxonomy


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    rank = snakemake.wildcards.rank
    try:
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
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("trait identification failed")
        raise


if __name__ == "__main__":
    main()
