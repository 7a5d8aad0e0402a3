"""Snakemake adapter for rule fidelity: see promptcam.fidelity.run_rank_fidelity."""

import logging

from promptcam.fidelity import FidelityConfig, run_rank_fidelity


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = FidelityConfig.from_dict(
            {
                **snakemake.params.settings,
                "threads": snakemake.threads,
                # Read from the config, not params, so changing it reruns nothing.
                "device": snakemake.config["traits"]["fidelity"]["device"],
                "linear_probe": snakemake.params.linear_probe,
            }
        )
        run_rank_fidelity(
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            rank=snakemake.wildcards.rank,
            trait_maps=snakemake.input.maps,
            out_tsv=snakemake.output.table,
            out_counterfactual=snakemake.output.counterfactual,
            config=config,
        )
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("fidelity evaluation failed")
        raise


if __name__ == "__main__":
    main()
