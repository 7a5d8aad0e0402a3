"""Snakemake adapter for rule evaluate: see promptcam.evaluation.evaluate.evaluate_rank."""

from promptcam.config import settings_from_config
from promptcam.evaluation.evaluate import EvalConfig, evaluate_rank
from promptcam.joblog import job_log


def main() -> None:
    rank = snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"evaluate {rank}"):
        settings = snakemake.params.settings
        runtime = {
            # The job's cores less its loader workers.
            "threads": max(1, snakemake.threads - settings["num_workers"]),
            # Evaluation runs where training does: train.device, a runtime key, read from the
            # config, not params, so that moving to a GPU does not re-evaluate.
            "device": snakemake.config["train"]["device"],
        }
        config = settings_from_config(EvalConfig, {**settings, **runtime}, "evaluate")
        evaluate_rank(
            shards_dir=snakemake.input.shards,
            rank=rank,
            checkpoint=snakemake.input.model,
            out_json=snakemake.output.eval,
            out_confusion=snakemake.output.confusion,
            config=config,
            labels_tsv=snakemake.input.labels,
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
