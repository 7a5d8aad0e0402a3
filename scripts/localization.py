"""Snakemake adapter for rule localization: see promptcam.localization.run_rank_localization."""

import logging

import torch

from promptcam.localization import run_rank_localization


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(snakemake.threads)
    try:
        run_rank_localization(
            trait_maps=snakemake.input.maps,
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            rank=snakemake.wildcards.rank,
            levels=snakemake.params.levels,
            out_json=snakemake.output[0],
            min_coverage=snakemake.params.min_coverage,
        )
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("localization failed")
        raise


if __name__ == "__main__":
    main()
