"""Snakemake adapter for rule generate_demo: see promptcam.demo.organisms.generate_demo_dataset."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "generating the demo dataset") as log:
        table = generate_demo_dataset(
            Path(snakemake.output.table).parent,
            settings_from_config(DemoConfig, snakemake.params.demo, "demo"),
            workers=snakemake.threads,
        )
        log.info("wrote %s", table)


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
