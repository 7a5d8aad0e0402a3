"""Snakemake adapter: pre-train the demo backbone in stages and export its weights and card."""

from promptcam.config import settings_from_config
from promptcam.demo.pretrain import PretrainConfig
from promptcam.demo.recipe import run_pretraining_stages
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "pre-training"):
        run_pretraining_stages(
            settings_from_config(
                PretrainConfig,
                {**snakemake.params.settings, "threads": snakemake.threads},
                "pretrain",
            ),
            snakemake.params.stages,
            snakemake.params.work_dir,
            snakemake.output.weights,
            command=snakemake.params.command,
            # A runtime key: read from the config, not params, so changing it reruns nothing.
            device=snakemake.config["pretrain"]["device"],
            probe_per_species=snakemake.params.probe_per_species,
        )


# The generator's DataLoader workers may re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
