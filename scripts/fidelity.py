"""Snakemake adapter for rule fidelity: see promptcam.evaluation.fidelity.run_rank_fidelity."""

from promptcam.evaluation.fidelity import FidelityConfig, run_rank_fidelity
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "fidelity evaluation"):
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


if __name__ == "__main__":
    main()
