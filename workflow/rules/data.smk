# Data stage: metadata (or the demo generator) -> validated table, splits, label maps,
# taxonomy -> WebDataset shards shared by every rank.


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
    params:
        demo=rule_settings("demo"),
    script:
        "../../scripts/generate_demo.py"


rule prepare_metadata:
    input:
        table=source_table(),
    output:
        metadata=data_path("metadata.parquet"),
        labels=[label_map(rank) for rank in levels()],
        taxonomy=taxonomy_tree(),
        summary=report(
            data_path("split_summary.tsv"),
            caption="../report/split_summary.rst",
            category="Data",
        ),
    log:
        log_path("data", "prepare_metadata"),
    benchmark:
        benchmark_path("data", "prepare_metadata")
    conda:
        "../../envs/data.yaml"
    threads: config["dataset"]["threads"]
    params:
        image_root=image_root,
        levels=levels(),
        image_column=config["dataset"]["image_column"],
        split_column=config["dataset"]["split_column"],
        mask_column=config["dataset"]["mask_column"],
        splits=canonical(config["splits"]),
    script:
        "../../scripts/prepare_metadata.py"


rule write_shards:
    input:
        table=source_table(),
        metadata=data_path("metadata.parquet"),
        labels=[label_map(rank) for rank in levels()],
    output:
        directory(shards_dir()),
    log:
        log_path("data", "write_shards"),
    benchmark:
        benchmark_path("data", "write_shards")
    conda:
        "../../envs/data.yaml"
    threads: config["shards"]["threads"]
    params:
        image_root=image_root,
        levels=levels(),
        shards=rule_settings("shards"),
    script:
        "../../scripts/write_shards.py"
