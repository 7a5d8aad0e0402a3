"""Snakemake adapter for rule train: see promptcam.training.train.train_rank."""

from pathlib import Path

from promptcam.joblog import job_log
from promptcam.training.train import TrainConfig, train_rank


def main() -> None:
    params = snakemake.params
    settings = dict(params.settings)
    model_config = settings.pop("model")
    transform = settings.pop("transform")
    # The job's cores: loader worker processes, the rest for torch's own threads.
    threads = max(1, snakemake.threads - settings["num_workers"])
    # Where and how it runs and how often it reports are read from the config, not params, so that
    # changing them does not retrain anything.
    runtime = {
        "threads": threads,
        "device": snakemake.config["train"]["device"],
        "progress_seconds": snakemake.config["train"]["progress_seconds"],
        "compile": snakemake.config["train"]["compile"],
        "mixed_precision": snakemake.config["train"]["mixed_precision"],
    }
    config = TrainConfig.from_dict({**settings, **runtime})
    with job_log(snakemake.log[0], "training"):
        train_rank(
            shards_dir=snakemake.input.shards,
            rank=snakemake.wildcards.rank,
            labels_tsv=snakemake.input.labels,
            backbone=params.backbone,
            model_config=model_config,
            train_config=config,
            out_dir=Path(snakemake.output.model).parent,
            transform=transform,
        )


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
