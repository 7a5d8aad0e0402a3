"""Snakemake adapter for rules fidelity and cam_maps: see promptcam.evaluation.fidelity
(run_rank_fidelity, run_rank_cam_maps)."""

from promptcam.config import runtime_settings, settings_from_config
from promptcam.evaluation.fidelity import FidelityConfig, run_rank_cam_maps, run_rank_fidelity
from promptcam.joblog import job_log


def main() -> None:
    rule, rank = snakemake.rule, snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"{rule} {rank}"):
        # Runtime keys are read from the config, not params, so changing them reruns nothing.
        runtime = {
            **runtime_settings(snakemake.config, "traits.fidelity"),
            "threads": snakemake.threads,
        }
        settings = {
            **snakemake.params.settings,
            **runtime,
            "linear_probe": snakemake.params.linear_probe,
        }
        inputs = {
            "checkpoint": snakemake.input.checkpoint,
            "shards_dir": snakemake.input.shards,
            "rank": rank,
            "trait_maps": snakemake.input.maps,
            "config": settings_from_config(FidelityConfig, settings, "traits.fidelity"),
        }
        if rule == "cam_maps":
            run_rank_cam_maps(**inputs, out_cam_maps=snakemake.output[0])
        else:
            run_rank_fidelity(
                **inputs,
                out_tsv=snakemake.output.table,
                out_counterfactual=snakemake.output.counterfactual,
                out_curves=snakemake.output.curves,
            )


if __name__ == "__main__":
    main()
