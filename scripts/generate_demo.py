"""Snakemake adapter for rule generate_demo: see promptcam.demo.generate_demo_dataset."""

import logging
from pathlib import Path

from promptcam.demo import DemoConfig, generate_demo_dataset


def main() -> None:
    logging.basicConfig(
        filename=snakemake.log[0],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        table = generate_demo_dataset(
            Path(snakemake.output.table).parent,
            DemoConfig(**snakemake.params.demo),
            workers=snakemake.threads,
        )
    except Exception:
        # The log must say why, not only the terminal.
        logging.exception("generating the demo dataset failed")
        raise
    logging.info("wrote %s", table)


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
