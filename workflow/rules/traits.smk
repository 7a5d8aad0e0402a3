# Traits stage, per rank: greedy head masking on the test split (traits.parquet and maps,
# per-class summary, cross-class attention), the demo's localisation against its ground-truth
# trait masks, and faithfulness (insertion/deletion AUC against baseline CAMs, counterfactual).


# With test_shard_groups n > 1, rule traits_part searches each group of test shards and rule
# traits only gathers the parts (byte for byte the files of one job); with n = 1 (default)
# rule traits searches the whole split and no part jobs run. Preempted (SIGTERM, SIGUSR1),
# either saves its batches so far in parts/ and exits 75; the retry resumes.
rule traits:
    name:
        whole_split_rule("traits")
    input:
        parts=scatter_parts("traits"),
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        taxonomy=taxonomy_tree(),
        labels=label_map("{rank}"),
        information=rank_result("{rank}", "head_information.tsv"),
    output:
        table=rank_result("{rank}", "traits.parquet"),
        maps=rank_result("{rank}", "trait_maps.npz"),
        summary=rank_result("{rank}", "trait_summary.tsv"),
        summary_maps=rank_result("{rank}", "trait_summary.npz"),
        cross_class=rank_result("{rank}", "cross_class.tsv"),
        cross_class_maps=rank_result("{rank}", "cross_class.npz"),
    log:
        log_path("traits", "traits_{rank}"),
    benchmark:
        benchmark_path("traits", "traits_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["threads"], config["max_threads"])
    resources:
        gpu=whole_split_gpu_request,
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings(
            "traits", "localization", "fidelity", "heads", "information"
        ),
        state=partial_state("{rank}", "traits"),
    script:
        "../../scripts/traits.py"


rule traits_part:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        taxonomy=taxonomy_tree(),
        labels=label_map("{rank}"),
        information=rank_result("{rank}", "head_information.tsv"),
    output:
        temp(part_file("{rank}", "traits", "{group}")),
    log:
        log_path("traits", "traits_{rank}_{group}"),
    benchmark:
        benchmark_path("traits", "traits_{rank}_{group}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings(
            "traits", "localization", "fidelity", "heads", "information"
        ),
        state=partial_state("{rank}", "traits", "{group}"),
    script:
        "../../scripts/traits.py"


rule head_information:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
    output:
        rank_result("{rank}", "head_information.tsv"),
    log:
        log_path("traits", "head_information_{rank}"),
    benchmark:
        benchmark_path("traits", "head_information_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["heads"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        probe=rule_settings("traits.heads"),
        information=rule_settings("traits.information"),
    script:
        "../../scripts/head_information.py"


rule heads:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
    output:
        rank_result("{rank}", "heads.tsv"),
    log:
        log_path("traits", "heads_{rank}"),
    benchmark:
        benchmark_path("traits", "heads_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["heads"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        settings=rule_settings("traits.heads"),
        levels=levels(),
        min_coverage=config["traits"]["localization"]["min_coverage"],
    script:
        "../../scripts/heads.py"


rule localization:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
        cam_maps=rank_result("{rank}", "cam_maps.npz"),
        heads=rank_result("{rank}", "heads.tsv"),
    output:
        report=rank_result("{rank}", "localization.json"),
        table=rank_result("{rank}", "localization.tsv"),
    log:
        log_path("traits", "localization_{rank}"),
    benchmark:
        benchmark_path("traits", "localization_{rank}")
    conda:
        "../../envs/traits.yaml"
    # Masks (test and train) against stored maps: no model forward, so no GPU.
    threads: 1
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        levels=levels(),
        min_coverage=config["traits"]["localization"]["min_coverage"],
    script:
        "../../scripts/localization.py"


# Every method's maps of every test image, for localisation (cheap, unlike fidelity's curves);
# fidelity recomputes those of the images it scores with the same functions and per-image
# random streams. Both explain the rank's one linear probe (rule linear_probe). With
# test_shard_groups n > 1, the *_part rules compute each group of test shards and cam_maps and
# fidelity only gather the parts (byte for byte the files of one job). Preempted (SIGTERM,
# SIGUSR1), any of them saves its batches so far in parts/ and exits 75; the retry resumes.
rule cam_maps:
    name:
        whole_split_rule("cam_maps")
    input:
        parts=scatter_parts("cam_maps"),
        checkpoint=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
    output:
        rank_result("{rank}", "cam_maps.npz"),
    log:
        log_path("traits", "cam_maps_{rank}"),
    benchmark:
        benchmark_path("traits", "cam_maps_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["fidelity"]["threads"], config["max_threads"])
    resources:
        gpu=whole_split_gpu_request,
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("traits.fidelity"),
        state=partial_state("{rank}", "cam_maps"),
    script:
        "../../scripts/fidelity.py"


rule cam_maps_part:
    input:
        checkpoint=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
    output:
        temp(part_file("{rank}", "cam_maps", "{group}")),
    log:
        log_path("traits", "cam_maps_{rank}_{group}"),
    benchmark:
        benchmark_path("traits", "cam_maps_{rank}_{group}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["fidelity"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("traits.fidelity"),
        state=partial_state("{rank}", "cam_maps", "{group}"),
    script:
        "../../scripts/fidelity.py"


rule fidelity:
    name:
        whole_split_rule("fidelity")
    input:
        parts=scatter_parts("fidelity"),
        checkpoint=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
    output:
        table=rank_result("{rank}", "fidelity.tsv"),
        counterfactual=rank_result("{rank}", "counterfactual.json"),
        curves=rank_result("{rank}", "fidelity_curves.tsv"),
    log:
        log_path("traits", "fidelity_{rank}"),
    benchmark:
        benchmark_path("traits", "fidelity_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["fidelity"]["threads"], config["max_threads"])
    resources:
        gpu=whole_split_gpu_request,
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("traits.fidelity"),
        state=partial_state("{rank}", "fidelity"),
    script:
        "../../scripts/fidelity.py"


rule fidelity_part:
    input:
        checkpoint=trained_model("{rank}"),
        probe=rank_result("{rank}", "linear_probe.npz"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=rank_result("{rank}", "trait_maps.npz"),
    output:
        temp(part_file("{rank}", "fidelity", "{group}")),
    log:
        log_path("traits", "fidelity_{rank}_{group}"),
    benchmark:
        benchmark_path("traits", "fidelity_{rank}_{group}")
    conda:
        "../../envs/traits.yaml"
    threads: min(config["traits"]["fidelity"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
        slurm_extra=SIGNAL_BEFORE_TIME_LIMIT,
    params:
        settings=rule_settings("traits.fidelity"),
        state=partial_state("{rank}", "fidelity", "{group}"),
    script:
        "../../scripts/fidelity.py"
