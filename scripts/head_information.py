"""Snakemake adapter for rule head_information: see
promptcam.traits.information.run_rank_head_information."""

from promptcam.config import runtime_settings, settings_from_config
from promptcam.joblog import job_log
from promptcam.traits.information import HeadInformationConfig, run_rank_head_information


def main() -> None:
    rank = snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"head_information {rank}"):
        # The probe and its runtime are the heads rule's (one probe for both tables); its
        # min_coverage is about localisation, which this rule does not measure.
        probe = {
            key: value
            for key, value in {
                **snakemake.params.probe,
                **runtime_settings(snakemake.config, "traits.heads"),
                "threads": snakemake.threads,
            }.items()
            if key != "min_coverage"
        }
        run_rank_head_information(
            checkpoint=snakemake.input.checkpoint,
            shards_dir=snakemake.input.shards,
            rank=rank,
            out_tsv=snakemake.output[0],
            config=settings_from_config(
                HeadInformationConfig,
                {**probe, **snakemake.params.information},
                "traits.information",
            ),
        )


if __name__ == "__main__":
    main()
