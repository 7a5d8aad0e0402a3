# Data stage: metadata table, folder tree or the demo generator -> validated table, splits,
# label maps, taxonomy -> WebDataset shards shared by every rank.
include: "dataset.smk"


# A few bytes: never worth a cluster job.
rule record_source:
    output:
        source_record(),
    log:
        log_path("data", "record_source"),
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        description=DATASET_SOURCE,
    script:
        "../../scripts/record_source.py"


rule generate_demo:
    output:
        table="results/demo/metadata.csv",
        images=directory("results/demo/images"),
        masks=directory("results/demo/masks"),
    log:
        log_path("data", "generate_demo"),
    benchmark:
        benchmark_path("data", "generate_demo")
    conda:
        "../../envs/data.yaml"
    threads: config["demo"]["threads"]
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        demo=rule_settings("demo"),
    script:
        "../../scripts/generate_demo.py"


# Writes results/data/problems.tsv too (every problem found), on purpose not an output:
# Snakemake deletes a failed job's outputs, and that list matters most when validation fails.
# A different dataset reruns this rule (and all after it): see promptcam.data.fingerprint.
rule prepare_metadata:
    input:
        unpack(source_inputs),
    output:
        metadata=data_path("metadata.parquet"),
        labels=[label_map(rank) for rank in levels()],
        taxonomy=taxonomy_tree(),
        summary=report(
            data_path("split_summary.tsv"),
            caption="../report/split_summary.rst",
            category="Data",
        ),
        skipped=report(
            data_path("skipped.tsv"),
            caption="../report/skipped.rst",
            category="Data",
        ),
        ingest=data_path("ingest.json"),
    log:
        log_path("data", "prepare_metadata"),
    benchmark:
        benchmark_path("data", "prepare_metadata")
    conda:
        "../../envs/data.yaml"
    threads: config["dataset"]["threads"]
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        table=source_table_param,
        image_root=image_root,
        levels=levels(),
        image_column=config["dataset"]["image_column"],
        split_column=config["dataset"]["split_column"],
        mask_column=config["dataset"]["mask_column"],
        splits=canonical(config["splits"]),
        ingest=ingest_settings(),
        dataset=DATASET_SOURCE,
    script:
        "../../scripts/prepare_metadata.py"


rule write_shards:
    input:
        unpack(source_inputs),
        metadata=data_path("metadata.parquet"),
        labels=[label_map(rank) for rank in levels()],
        ingest=data_path("ingest.json"),
    output:
        shards=directory(shards_dir()),
        counts=report(
            data_path("ingest_counts.tsv"),
            caption="../report/ingest_counts.rst",
            category="Data",
        ),
    log:
        log_path("data", "write_shards"),
    benchmark:
        benchmark_path("data", "write_shards")
    conda:
        "../../envs/data.yaml"
    threads: config["shards"]["threads"]
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        image_root=image_root,
        levels=levels(),
        shards=rule_settings("shards"),
        images=ingest_settings()["images"],
    script:
        "../../scripts/write_shards.py"
