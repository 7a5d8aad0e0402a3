"""Snakemake adapter: pre-train the demo backbone in stages and export its weights and card."""

import logging

from promptcam.pretrain import PretrainConfig, run_pretraining_stages

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(message)s")
run_pretraining_stages(
    PretrainConfig(**snakemake.params.settings, threads=snakemake.threads),
    snakemake.params.stages,
    snakemake.params.work_dir,
    snakemake.output.weights,
    command=snakemake.params.command,
    device=snakemake.params.device,
    probe_per_species=snakemake.params.probe_per_species,
)
