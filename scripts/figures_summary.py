"""Snakemake adapter for the summary figures (rules confusion_figure, accuracy_figure,
training_curves_figure, fidelity_curves_figure, counterfactual_figure, localization_figure):
see promptcam.figures.summaries."""

from pathlib import Path

from promptcam.config import settings_from_config
from promptcam.figures import summaries
from promptcam.figures.style import FigureStyle
from promptcam.joblog import job_log

# rule -> (drawing function, its keyword for the per-rank input files)
ACROSS_RANKS = {
    "accuracy_figure": (summaries.draw_accuracy, "eval_reports"),
    "training_curves_figure": (summaries.draw_training_curves, "metrics"),
    "fidelity_curves_figure": (summaries.draw_fidelity_curves, "curves"),
    "counterfactual_figure": (summaries.draw_counterfactual, "counterfactual"),
}


def main() -> None:
    rule = snakemake.rule
    with job_log(snakemake.log[0], rule) as log:
        style = settings_from_config(FigureStyle, snakemake.params.style, "figures.style")
        out_stem = Path(snakemake.output.pdf).with_suffix("")
        if rule == "confusion_figure":
            written = summaries.draw_confusion(
                confusion=Path(snakemake.input[0]),
                rank=snakemake.wildcards.rank,
                out_stem=out_stem,
                style=style,
            )
        elif rule == "localization_figure":
            levels = snakemake.params.levels
            written = summaries.draw_localization(
                localization=dict(zip(levels, map(Path, snakemake.input.reports), strict=True)),
                tables=dict(zip(levels, map(Path, snakemake.input.tables), strict=True)),
                out_stem=out_stem,
                style=style,
            )
        else:
            draw, keyword = ACROSS_RANKS[rule]
            files = dict(zip(snakemake.params.levels, map(Path, snakemake.input), strict=True))
            written = draw(**{keyword: files}, out_stem=out_stem, style=style)
        log.info("wrote %d files", len(written))


if __name__ == "__main__":
    main()
