# Figures stage: paper-ready figures from the stages' output files (no model, no GPU), each
# as vector PDF and 300-dpi PNG. Per rank in results/{rank}/figures/, across ranks in
# results/figures/. Look and sizes: config figures (style: journal column widths in mm).


rule trait_panels:
    input:
        table=rank_result("{rank}", "traits.parquet"),
        maps=rank_result("{rank}", "trait_maps.npz"),
        shards=shards_dir(),
    output:
        report(
            directory(rank_figure("{rank}", "trait_panels")),
            patterns=["{name}.png"],
            caption="../report/figures_trait_panels.rst",
            category="Traits",
            subcategory="{rank}",
        ),
    log:
        log_path("figures", "trait_panels_{rank}"),
    benchmark:
        benchmark_path("figures", "trait_panels_{rank}")
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params("panels"),
        levels=levels(),
    script:
        "../../scripts/figures_traits.py"


rule trait_gallery:
    input:
        table=rank_result("{rank}", "traits.parquet"),
        maps=rank_result("{rank}", "trait_maps.npz"),
        shards=shards_dir(),
    output:
        report(
            directory(rank_figure("{rank}", "gallery")),
            patterns=["{name}.png"],
            caption="../report/figures_gallery.rst",
            category="Traits",
            subcategory="{rank}",
        ),
    log:
        log_path("figures", "trait_gallery_{rank}"),
    benchmark:
        benchmark_path("figures", "trait_gallery_{rank}")
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params("gallery"),
        levels=levels(),
    script:
        "../../scripts/figures_traits.py"


rule cross_class_figure:
    input:
        table=rank_result("{rank}", "cross_class.tsv"),
        maps=rank_result("{rank}", "cross_class.npz"),
        shards=shards_dir(),
    output:
        pdf=rank_figure("{rank}", "cross_class.pdf"),
        png=report(
            rank_figure("{rank}", "cross_class.png"),
            caption="../report/figures_cross_class.rst",
            category="Traits",
            subcategory="{rank}",
        ),
    log:
        log_path("figures", "cross_class_{rank}"),
    benchmark:
        benchmark_path("figures", "cross_class_{rank}")
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params("cross_class"),
        levels=levels(),
    script:
        "../../scripts/figures_traits.py"


rule confusion_figure:
    input:
        rank_result("{rank}", "confusion.tsv"),
    output:
        pdf=rank_figure("{rank}", "confusion.pdf"),
        png=report(
            rank_figure("{rank}", "confusion.png"),
            caption="../report/figures_confusion.rst",
            category="Evaluation",
            subcategory="{rank}",
        ),
    log:
        log_path("figures", "confusion_{rank}"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
    script:
        "../../scripts/figures_summary.py"


rule coarse_to_fine:
    input:
        tables=per_rank("traits.parquet").values(),
        maps=per_rank("trait_maps.npz").values(),
        taxonomy=taxonomy_tree(),
        shards=shards_dir(),
    output:
        report(
            directory(cross_rank_figure("coarse_to_fine")),
            patterns=["{name}.png"],
            caption="../report/figures_coarse_to_fine.rst",
            category="Across ranks",
        ),
    log:
        log_path("figures", "coarse_to_fine"),
    benchmark:
        benchmark_path("figures", "coarse_to_fine")
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params("coarse_to_fine"),
        levels=levels(),
    script:
        "../../scripts/figures_across_ranks.py"


rule tree_overview:
    input:
        tables=per_rank("traits.parquet").values(),
        maps=per_rank("trait_maps.npz").values(),
        taxonomy=taxonomy_tree(),
        shards=shards_dir(),
    output:
        pdf=[
            cross_rank_figure(f"tree_{layout}.pdf")
            for layout in config["figures"]["tree"]["layouts"]
        ],
        png=[
            report(
                cross_rank_figure(f"tree_{layout}.png"),
                caption="../report/figures_tree.rst",
                category="Across ranks",
            )
            for layout in config["figures"]["tree"]["layouts"]
        ],
    log:
        log_path("figures", "tree_overview"),
    benchmark:
        benchmark_path("figures", "tree_overview")
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params("tree"),
        levels=levels(),
    script:
        "../../scripts/figures_across_ranks.py"


rule accuracy_figure:
    input:
        per_rank("eval.json").values(),
    output:
        pdf=cross_rank_figure("accuracy.pdf"),
        png=report(
            cross_rank_figure("accuracy.png"),
            caption="../report/figures_accuracy.rst",
            category="Summaries",
        ),
    log:
        log_path("figures", "accuracy"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
        levels=levels(),
    script:
        "../../scripts/figures_summary.py"


rule training_curves_figure:
    input:
        per_rank("metrics.tsv").values(),
    output:
        pdf=cross_rank_figure("training_curves.pdf"),
        png=report(
            cross_rank_figure("training_curves.png"),
            caption="../report/figures_training_curves.rst",
            category="Summaries",
        ),
    log:
        log_path("figures", "training_curves"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
        levels=levels(),
    script:
        "../../scripts/figures_summary.py"


rule fidelity_curves_figure:
    input:
        per_rank("fidelity_curves.tsv").values(),
    output:
        pdf=cross_rank_figure("fidelity_curves.pdf"),
        png=report(
            cross_rank_figure("fidelity_curves.png"),
            caption="../report/figures_fidelity_curves.rst",
            category="Summaries",
        ),
    log:
        log_path("figures", "fidelity_curves"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
        levels=levels(),
    script:
        "../../scripts/figures_summary.py"


rule counterfactual_figure:
    input:
        per_rank("counterfactual.json").values(),
    output:
        pdf=cross_rank_figure("counterfactual.pdf"),
        png=report(
            cross_rank_figure("counterfactual.png"),
            caption="../report/figures_counterfactual.rst",
            category="Summaries",
        ),
    log:
        log_path("figures", "counterfactual"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
        levels=levels(),
    script:
        "../../scripts/figures_summary.py"


rule localization_figure:
    input:
        reports=per_rank("localization.json").values(),
        tables=per_rank("localization.tsv").values(),
    output:
        pdf=cross_rank_figure("localization.pdf"),
        png=report(
            cross_rank_figure("localization.png"),
            caption="../report/figures_localization.rst",
            category="Summaries",
        ),
    log:
        log_path("figures", "localization"),
    conda:
        "../../envs/figures.yaml"
    resources:
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        **figure_params(),
        levels=levels(),
    script:
        "../../scripts/figures_summary.py"
