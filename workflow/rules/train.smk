# Train stage, per rank: Prompt-CAM on the frozen backbone (model selected on val), then the
# test-split evaluation next to a linear probe on the same backbone.
#
# Each rank's settings are config["train"]["defaults"] deep-merged with
# config["train"]["ranks"][rank] and passed as params, so editing one rank's settings reruns
# that rank only. An interrupted training resumes from results/{rank}/last.pt.
#
# GPUs of one rank's train job: its data-parallel processes (train gpus), none when the GPU
# rules run on CPU nodes (gpus_per_job 0).
#
# Preemption and time limits: SIGTERM or SIGUSR1 makes training save a resumable last.pt at
# its next step and exit 75 (promptcam.training.preemption); the profile's retries resume it
# in a new job (SIGNAL_BEFORE_TIME_LIMIT, common.smk). Not SIGUSR1: SLURM signals every process
# of the job step, and the Snakemake process that runs this rule inside the step dies of
# SIGUSR1 (its default action) but waits for its job on SIGTERM.
rule train:
    input:
        shards=shards_dir(),
        labels=label_map("{rank}"),
        weights=backbone_weights(),
    output:
        model=trained_model("{rank}"),
        metrics=report(
            rank_result("{rank}", "metrics.tsv"),
            caption="../report/train_metrics.rst",
            category="Training",
            subcategory="{rank}",
        ),
    log:
        log_path("train", "{rank}"),
    benchmark:
        benchmark_path("train", "{rank}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["train"]["threads"], config["max_threads"])
    resources:
        gpu=lambda wildcards: (
            gpu_request() and train_settings(wildcards.rank).get("gpus", 1)
        ),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=lambda wildcards: train_settings(wildcards.rank),
        backbone=canonical(config["backbone"]),
    script:
        "../../scripts/train.py"


# The rank's linear probe on the frozen backbone, fitted once on train/val: evaluate scores it
# on test, cam_maps and fidelity explain it.
rule linear_probe:
    input:
        shards=shards_dir(),
        model=trained_model("{rank}"),
        weights=backbone_weights(),
    output:
        rank_result("{rank}", "linear_probe.npz"),
    log:
        log_path("evaluate", "linear_probe_{rank}"),
    benchmark:
        benchmark_path("evaluate", "linear_probe_{rank}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["evaluate"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        settings=rule_settings("evaluate"),
    script:
        "../../scripts/evaluate.py"


# With test_shard_groups n > 1, rule evaluate_part scores each group of test shards and rule
# evaluate only gathers the parts (byte for byte the files of one job). Preempted (SIGTERM,
# SIGUSR1), either saves its batches so far in parts/ and exits 75; the retry resumes.
rule evaluate:
    name:
        whole_split_rule("evaluate")
    input:
        parts=scatter_parts("evaluate"),
        shards=shards_dir(),
        labels=label_map("{rank}"),
        model=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
    output:
        eval=report(
            rank_result("{rank}", "eval.json"),
            caption="../report/train_evaluation.rst",
            category="Evaluation",
            subcategory="{rank}",
        ),
        confusion=report(
            rank_result("{rank}", "confusion.tsv"),
            caption="../report/train_confusion.rst",
            category="Evaluation",
            subcategory="{rank}",
        ),
    log:
        log_path("evaluate", "{rank}"),
    benchmark:
        benchmark_path("evaluate", "{rank}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["evaluate"]["threads"], config["max_threads"])
    resources:
        gpu=whole_split_gpu_request,
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("evaluate"),
        state=partial_state("{rank}", "evaluate"),
    script:
        "../../scripts/evaluate.py"


rule evaluate_part:
    input:
        shards=shards_dir(),
        model=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
    output:
        temp(part_file("{rank}", "evaluate", "{group}")),
    log:
        log_path("evaluate", "{rank}_{group}"),
    benchmark:
        benchmark_path("evaluate", "{rank}_{group}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["evaluate"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("evaluate"),
        state=partial_state("{rank}", "evaluate", "{group}"),
    script:
        "../../scripts/evaluate.py"
