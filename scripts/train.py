"""Snakemake adapter for rule train: see promptcam.training.train.train_rank and, for the exit
codes (75: stopped on SIGTERM/SIGUSR1 with a resumable last.pt), promptcam.training.launch."""

import sys
from pathlib import Path

from promptcam.config import runtime_settings, settings_from_config
from promptcam.joblog import job_log
from promptcam.training.launch import train_in_processes, training_spec
from promptcam.training.train import TrainConfig


def main() -> int:
    params, rank = snakemake.params, snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"train {rank}"):
        settings = dict(params.settings)
        model_config = settings.pop("model")
        transform = settings.pop("transform")
        # Where and how it runs (the schema's runtime keys) is read from the config, not
        # params, so that changing it retrains nothing. The job's cores, shared by its
        # `gpus` processes: loader worker processes, the rest for torch's own threads.
        runtime = runtime_settings(snakemake.config, "train")
        processes = settings.get("gpus", 1)
        spare = snakemake.threads - processes * settings["num_workers"]
        runtime["threads"] = max(1, spare // processes)
        config = settings_from_config(TrainConfig, {**settings, **runtime}, "train")
        spec = training_spec(
            shards_dir=snakemake.input.shards,
            rank=rank,
            labels_tsv=snakemake.input.labels,
            backbone=params.backbone,
            model_config=model_config,
            train_config=config,
            out_dir=Path(snakemake.output.model).parent,
            transform=transform,
        )
        return train_in_processes(spec, log=snakemake.log[0])


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    sys.exit(main())
