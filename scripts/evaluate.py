"""Snakemake adapter for rule evaluate: see promptcam.evaluation.evaluate.evaluate_rank."""

from promptcam.evaluation.evaluate import EvalConfig, evaluate_rank
from promptcam.joblog import job_log


def main() -> None:
    settings = dict(snakemake.params.settings)
    threads = max(1, snakemake.threads - settings.get("num_workers", 0))
    # Read from the config, not params, so that moving to a GPU does not re-evaluate.
    device = snakemake.config["train"]["device"]
    config = EvalConfig.from_dict({**settings, "threads": threads, "device": device})
    with job_log(snakemake.log[0], "evaluation"):
        evaluate_rank(
            shards_dir=snakemake.input.shards,
            rank=snakemake.wildcards.rank,
            checkpoint=snakemake.input.model,
            out_json=snakemake.output.eval,
            out_confusion=snakemake.output.confusion,
            config=config,
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
