"""Snakemake adapter for rules linear_probe, evaluate, evaluate_part and evaluate_gather: see
promptcam.evaluation.evaluate (fit_rank_probe, evaluate_rank, run_evaluate_part,
gather_evaluation). Exit 75: stopped on SIGTERM/SIGUSR1, state saved."""

import sys

from promptcam.config import settings_from_config
from promptcam.data.reader import ShardGroup
from promptcam.evaluation.evaluate import (
    EvalConfig,
    evaluate_rank,
    fit_rank_probe,
    gather_evaluation,
    run_evaluate_part,
)
from promptcam.joblog import job_log
from promptcam.resources import gathering_rule
from promptcam.training.preemption import exit_status


def main() -> int:
    rule, rank = snakemake.rule, snakemake.wildcards.rank
    group = getattr(snakemake.wildcards, "group", None)
    with job_log(snakemake.log[0], " ".join(filter(None, [rule, rank, group]))):
        settings = snakemake.params.settings
        runtime = {
            # The job's cores less its loader workers.
            "threads": max(1, snakemake.threads - settings["num_workers"]),
            # Evaluation runs where training does: train.device, a runtime key, read from the
            # config, not params, so that moving to a GPU does not re-evaluate.
            "device": snakemake.config["train"]["device"],
        }
        config = settings_from_config(EvalConfig, {**settings, **runtime}, "evaluate")
        common = {
            "shards_dir": snakemake.input.shards,
            "rank": rank,
            "checkpoint": snakemake.input.model,
            "config": config,
        }
        if rule == "linear_probe":
            fit_rank_probe(**common, out_probe=snakemake.output[0])
            return 0
        if rule == "evaluate_part":
            return exit_status(
                run_evaluate_part,
                **common,
                probe=snakemake.input.probe,
                out_part=snakemake.output[0],
                group=ShardGroup.parse(group),
                state_path=snakemake.params.state,
            )
        outputs = {
            **common,
            "probe": snakemake.input.probe,
            "out_json": snakemake.output.eval,
            "out_confusion": snakemake.output.confusion,
            "labels_tsv": snakemake.input.labels,
        }
        if rule == gathering_rule("evaluate"):
            return exit_status(gather_evaluation, parts=list(snakemake.input.parts), **outputs)
        return exit_status(evaluate_rank, **outputs, state_path=snakemake.params.state)


# Spawned worker processes re-run this file: do the work only in the parent.
if __name__ == "__main__":
    sys.exit(main())
