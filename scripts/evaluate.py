"""Snakemake adapter for rule evaluate: see promptcam.evaluate.evaluate_rank."""

import contextlib
import logging

from promptcam.evaluate import EvalConfig, evaluate_rank


def main() -> None:
    settings = dict(snakemake.params.settings)
    threads = max(1, snakemake.threads - settings.get("num_workers", 0))
    # Read from the config, not params, so that moving to a GPU does not re-evaluate.
    device = snakemake.config["train"]["device"]
    config = EvalConfig.from_dict({**settings, "threads": threads, "device": device})
    with (
        open(snakemake.log[0], "a") as log,
        # Warnings (e.g. from scikit-learn) write to stderr: keep them in the job's log too.
        contextlib.redirect_stderr(log),
    ):
        logging.basicConfig(
            stream=log,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            evaluate_rank(
                shards_dir=snakemake.input.shards,
                rank=snakemake.wildcards.rank,
                checkpoint=snakemake.input.model,
                out_json=snakemake.output.eval,
                out_confusion=snakemake.output.confusion,
                config=config,
            )
        except Exception:
            # The log must say why, not only the terminal.
            logging.exception("evaluation failed")
            raise


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    main()
