"""Summary figures of the evaluation: accuracy, training curves, faithfulness, localisation and
the counterfactual check, each across the ranks (coarse to fine, in the order given).

Every ``build_*`` function returns the matplotlib Figure (a test can read what is drawn);
every ``draw_*`` function builds it inside :func:`styled` and saves it with
:func:`save_figure`, returning ``[stem.pdf, stem.png]``. The confusion matrices live in
:mod:`promptcam.figures.confusion` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator, PercentFormatter

from promptcam.evaluation.tables import (
    FIDELITY_MODES,
    fidelity_curve_aucs,
    read_counterfactual,
    read_eval_report,
    read_fidelity_curves,
    read_localization,
    read_localization_table,
)
from promptcam.figures.confusion import build_confusion, draw_confusion
from promptcam.figures.style import FigureStyle, new_figure, save_figure, styled
from promptcam.training.metrics import read_metrics

__all__ = [
    "build_accuracy",
    "build_confusion",
    "build_counterfactual",
    "build_fidelity_curves",
    "build_localization",
    "build_training_curves",
    "draw_accuracy",
    "draw_confusion",
    "draw_counterfactual",
    "draw_fidelity_curves",
    "draw_localization",
    "draw_training_curves",
]

METHOD_NAMES = {
    "prompt_cam": "Prompt-CAM",
    "grad_cam": "Grad-CAM",
    "layer_cam": "Layer-CAM",
    "eigen_cam": "Eigen-CAM",
    "attention_rollout": "Attention rollout",
    "random": "Random map",
}
CHANCE_STYLE = {"color": "0.2", "linestyle": (0, (3, 2)), "linewidth": 0.8}
BAR_GROUP_WIDTH = 0.8
MAX_LABELLED_GROUPS = 5  # bar values printed while the bars are wide enough
AUC_ENTRY_MM = 11.5  # width of one "line 0.00" legend entry
MAX_MARKED_EPOCHS = 30  # a marker per epoch while they stay apart


def rank_label(rank: str) -> str:
    """A rank as an axis label: ``species`` -> ``Species``."""
    return rank[:1].upper() + rank[1:]


def _require(report: Mapping[str, Any], keys: Sequence[str], path: Path, rule: str) -> None:
    missing = [key for key in keys if key not in report]
    if missing:
        raise ValueError(f"{path}: no {missing}; rerun the {rule} rule")


def _read_each(files: Mapping[str, Path], read: Callable[[Path], Any], what: str) -> dict[str, Any]:
    if not files:
        raise ValueError(f"no {what} files given: one per rank, coarse to fine")
    return {rank: read(Path(path)) for rank, path in files.items()}


def _percent_axis(ax: Axes, label: str) -> None:
    ax.set_ylim(0, 100)
    ax.set_ylabel(label)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))


def grouped_bars(
    ax: Axes,
    values: pd.DataFrame,
    colors: Sequence[Any],
    chance: pd.DataFrame | None = None,
) -> None:
    """Bars of ``values`` (index: groups on the x axis, columns: series side by side), NaN
    left out; ``chance`` (same shape) as a dashed line over each bar."""
    groups, series = len(values.index), len(values.columns)
    width = BAR_GROUP_WIDTH / series
    for k, column in enumerate(values.columns):
        x = np.arange(groups) - BAR_GROUP_WIDTH / 2 + (k + 0.5) * width
        heights = values[column].to_numpy(np.float64)
        shown = ~np.isnan(heights)
        ax.bar(x[shown], heights[shown], width * 0.92, color=colors[k], label=column)
        if chance is not None:
            level = chance[column].to_numpy(np.float64)
            at = ~np.isnan(level)
            ax.hlines(level[at], x[at] - width / 2, x[at] + width / 2, **CHANCE_STYLE, zorder=3)
    ax.set_xticks(np.arange(groups), list(values.index))
    ax.set_xlim(-0.5, groups - 0.5)
    sns.despine(ax=ax)


def label_bars(ax: Axes, style: FigureStyle, inside_above: float = 15.0) -> None:
    """Each bar's value (%) written inside its top (outside for short bars)."""
    size = max(5.0, style.font_size - 1.5)
    for bar in ax.patches:
        height = bar.get_height()
        inside = height >= inside_above
        ax.annotate(
            f"{height:.0f}%" if height >= 9.5 or height == 0 else f"{height:.1f}%",
            (bar.get_x() + bar.get_width() / 2, height),
            xytext=(0, -2 if inside else 1),
            textcoords="offset points",
            ha="center",
            va="top" if inside else "bottom",
            fontsize=size,
            color="white" if inside else "0.15",
        )


def _chance_handle() -> Line2D:
    return Line2D([], [], **CHANCE_STYLE, label="Chance")


def _legend_above(fig: Figure, handles: Sequence[Any], columns: int | None = None) -> None:
    """One legend for the whole figure, above the panels (never over the data)."""
    fig.legend(
        handles=list(handles),
        loc="outside upper center",
        ncols=columns or len(handles),
        frameon=False,
        handlelength=1.6,
        columnspacing=1.2,
    )


# ----------------------------------------------------------------------------- accuracy


def build_accuracy(*, eval_reports: Mapping[str, Path], style: FigureStyle) -> Figure:
    """Bars: test top-1 of Prompt-CAM and of the linear probe per rank, chance dashed."""
    reports = _read_each(eval_reports, read_eval_report, "eval.json")
    for rank, report in reports.items():
        _require(report, ("top1", "chance_top1"), Path(eval_reports[rank]), "evaluate")
    index = [rank_label(rank) for rank in reports]
    values = pd.DataFrame(
        {
            "Prompt-CAM": [100 * r["top1"] for r in reports.values()],
            "Linear probe": [
                100 * (r.get("linear_probe_top1") or np.nan) for r in reports.values()
            ],
        },
        index=index,
    )
    chance = pd.DataFrame({column: [100 * r["chance_top1"] for r in reports.values()]
                           for column in values.columns}, index=index)  # fmt: skip
    fig = new_figure(style, 1, 55)
    ax = fig.add_subplot()
    colors = sns.color_palette(style.palette)
    grouped_bars(ax, values, colors, chance)
    _percent_axis(ax, "Test top-1 accuracy")
    ax.set_xlabel("Rank of the model")
    if len(values) <= MAX_LABELLED_GROUPS:
        label_bars(ax, style)
    handles, _ = ax.get_legend_handles_labels()
    _legend_above(fig, [*handles, _chance_handle()])
    return fig


def draw_accuracy(
    *, eval_reports: Mapping[str, Path], out_stem: Path, style: FigureStyle
) -> list[Path]:
    """Prompt-CAM's and the linear probe's test top-1 per rank (coarse to fine, as given), with
    each rank's chance level dashed; one column wide."""
    with styled(style):
        return save_figure(build_accuracy(eval_reports=eval_reports, style=style), out_stem, style)


# ----------------------------------------------------------------------------- training


def _panel_grid(
    fig: Figure, panels: int, rows_per_panel: int, max_columns: int
) -> list[list[Axes]]:
    """Per panel (rank), its ``rows_per_panel`` stacked axes; panels wrap after
    ``max_columns``."""
    columns = min(panels, max_columns)
    blocks = -(-panels // columns)
    grid = fig.add_gridspec(blocks * rows_per_panel, columns)
    return [
        [
            fig.add_subplot(grid[(p // columns) * rows_per_panel + r, p % columns])
            for r in range(rows_per_panel)
        ]
        for p in range(panels)
    ]


def build_training_curves(*, metrics: Mapping[str, Path], style: FigureStyle) -> Figure:
    """Per rank (a column): train and val loss (top), val top-1 (bottom) per epoch."""
    tables = _read_each(metrics, read_metrics, "metrics.tsv")
    blocks = -(-len(tables) // 4)
    fig = new_figure(style, 2, min(style.max_height_mm, 12 + 58 * blocks))
    colors = sns.color_palette(style.palette)
    axes = _panel_grid(fig, len(tables), 2, 4)
    longest = max(len(table) for table in tables.values())
    marker = {"marker": "o", "markersize": 2} if longest <= MAX_MARKED_EPOCHS else {}
    for panel, ((rank, table), (loss_ax, top1_ax)) in enumerate(
        zip(tables.items(), axes, strict=True)
    ):
        epochs = table["epoch"].to_numpy()
        loss_ax.plot(epochs, table["train_loss"], color=colors[0], **marker)
        loss_ax.plot(epochs, table["val_loss"], color=colors[1], **marker)
        top1_ax.plot(epochs, 100 * table["val_top1"], color=colors[1], **marker)
        loss_ax.set_title(rank_label(rank))
        loss_ax.set_ylim(bottom=0)
        first = panel % 4 == 0
        loss_ax.set_ylabel("Cross-entropy loss" if first else "")
        _percent_axis(top1_ax, "Val. top-1 accuracy" if first else "")
        top1_ax.set_xlabel("Epoch")
        for ax in (loss_ax, top1_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(epochs.min() - 0.3, epochs.max() + 0.3)
            sns.despine(ax=ax)
        loss_ax.tick_params(labelbottom=False)
    handles = [
        Line2D([], [], color=colors[0], **marker, label="Training"),
        Line2D([], [], color=colors[1], **marker, label="Validation"),
    ]
    _legend_above(fig, handles)
    return fig


def draw_training_curves(
    *, metrics: Mapping[str, Path], out_stem: Path, style: FigureStyle
) -> list[Path]:
    """Per rank, training and validation loss and validation top-1 per epoch (metrics.tsv);
    two columns wide, ranks side by side."""
    with styled(style):
        return save_figure(build_training_curves(metrics=metrics, style=style), out_stem, style)


# ----------------------------------------------------------------------------- fidelity


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method.replace("_", " "))


FIDELITY_MODELS = {"prompt_cam": "Prompt-CAM model", "linear_probe": "Linear probe"}
FIDELITY_PANEL_MM = 50  # height of one (model, mode) row of panels, its AUC legend included


def build_fidelity_curves(*, curves: Mapping[str, Path], style: FigureStyle) -> Figure:
    """One row of panels per model and mode (the Prompt-CAM model's insertion and deletion,
    then the linear probe's), one column per rank: each method's mean curve on the model it
    explains, beside a random map's (grey, dotted). Each panel's legend gives the AUCs; its
    corner, the model's clean-image probability (what the AUCs are normalised by)."""
    tables = _read_each(curves, read_fidelity_curves, "fidelity_curves.tsv")
    methods = list(
        dict.fromkeys(m for table in tables.values() for m in table["method"] if m != "random")
    )
    palette = dict(zip(methods, sns.color_palette(style.palette, len(methods)), strict=True))
    palette["random"] = (0.45, 0.45, 0.45)
    models = [m for m in FIDELITY_MODELS if any(m in set(t["model"]) for t in tables.values())]
    panels = [(model, mode) for model in models for mode in FIDELITY_MODES]
    fig = new_figure(style, 2, FIDELITY_PANEL_MM * len(panels))
    grid = fig.subplots(len(panels), len(tables), sharey=True, squeeze=False)
    panel_mm = style.width_mm(2) / len(tables)
    for column, (rank, table) in enumerate(tables.items()):
        aucs = fidelity_curve_aucs(table).set_index(["method", "model", "mode"])["auc"]
        n_images = int(table["n_images"].max())
        for row, (model, mode) in enumerate(panels):
            ax = grid[row, column]
            rows = table[(table["mode"] == mode) & (table["model"] == model)]
            for method, curve in rows.groupby("method", sort=False):
                curve = curve.sort_values("step")
                ax.plot(
                    100 * curve["fraction"],
                    curve["probability"],
                    **_curve_style(palette[method], method),
                    label=f"{aucs[(method, model, mode)]:.2f}",
                )
            _fidelity_axes(ax, rows, model, mode, row == len(panels) - 1, column == 0)
            if row == 0:
                ax.set_title(f"{rank_label(rank)} (n = {n_images})")
            entries = rows["method"].nunique()
            ax.legend(
                title=f"{mode.capitalize()} AUC",
                loc="upper center",
                bbox_to_anchor=(0.5, -0.18 if row < len(panels) - 1 else -0.32),
                ncols=entries if panel_mm >= AUC_ENTRY_MM * entries else 3,
                frameon=False,
                handlelength=1.2,
                handletextpad=0.4,
                columnspacing=0.8,
                borderaxespad=0,
            )
            sns.despine(ax=ax)
    handles = [
        Line2D([], [], **_curve_style(palette[m], m), label=method_name(m))
        for m in [*methods, "random"]
    ]
    _legend_above(fig, handles)
    return fig


def _fidelity_axes(
    ax: Axes, rows: pd.DataFrame, model: str, mode: str, bottom: bool, left: bool
) -> None:
    """Limits, labels and the clean-image probability of one (model, mode) panel."""
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
    if bottom:
        ax.set_xlabel("Patches inserted or deleted")
    if left:
        ax.set_ylabel(f"{FIDELITY_MODELS[model]}\n{mode}: true-class prob.")
    # The clean image: where deletion starts and insertion ends.
    clean_step = rows["step"].max() if mode == "insertion" else 0
    clean = rows.loc[rows["step"] == clean_step, "probability"].mean()
    ax.text(0.98, 0.98 if mode == "deletion" else 0.04, f"clean {clean:.2f}",
            transform=ax.transAxes, ha="right", va="top" if mode == "deletion" else "bottom",
            color="0.3")  # fmt: skip


def _curve_style(color: Any, method: str) -> dict[str, Any]:
    """Prompt-CAM's own maps solid and wider, the baselines dashed, the random map dotted."""
    if method == "prompt_cam":
        return {"color": color, "linewidth": 1.3, "linestyle": "-"}
    if method == "random":
        return {"color": color, "linewidth": 0.9, "linestyle": (0, (1, 1.2))}
    return {"color": color, "linewidth": 0.9, "linestyle": (0, (4, 1.5))}


def draw_fidelity_curves(
    *, curves: Mapping[str, Path], out_stem: Path, style: FigureStyle
) -> list[Path]:
    """Mean insertion and deletion curves (fidelity_curves.tsv) of every method, one row of
    panels per model and mode, one column per rank, AUC in each legend; Prompt-CAM solid, the
    baselines dashed, a random map dotted."""
    with styled(style):
        return save_figure(build_fidelity_curves(curves=curves, style=style), out_stem, style)


# ----------------------------------------------------------------------------- localization

LOCALIZATION_KEYS = ("pointing_game", "pointing_game_chance", "energy_in_mask",
                     "energy_in_mask_chance", "by_trait")  # fmt: skip


def _score(scores: Mapping[str, Any], key: str) -> float:
    value = scores.get(key)
    return np.nan if value is None else 100 * float(value)


LOCALIZATION_METHOD_NAMES = {
    "prompt_cam_top_head": "Top head",
    "prompt_cam_kept_heads": "Kept heads, mean map",
    "prompt_cam_kept_heads_pooled": "Kept heads, pooled",
    "prompt_cam_best_fixed_head": "Best fixed head",
    "random": "Random map",
}
LOCALIZATION_MODELS = {"prompt_cam": "Prompt-CAM model", "linear_probe": "Linear probe"}
FIXED_PLACE_STYLE = {"color": "#b2182b", "linestyle": (0, (1, 1)), "linewidth": 1.0}
LOCALIZATION_METRICS = (
    ("pointing_game", "Pointing game on own trait"),
    ("energy_in_mask", "Energy in own trait mask"),
)


def localization_method_label(method: str, fixed_head: Any = None) -> str:
    """``prompt_cam_best_fixed_head`` with head 6 -> ``Best fixed head (6)``; baselines by
    :func:`method_name`."""
    label = LOCALIZATION_METHOD_NAMES.get(method) or method_name(method)
    if method == "prompt_cam_best_fixed_head" and not pd.isna(fixed_head):
        label += f" ({int(fixed_head)})"
    return label


def localization_bars(table: pd.DataFrame) -> pd.DataFrame:
    """``localization.tsv``'s rows in drawing order (grouped by model: Prompt-CAM's own
    methods, the baselines on the Prompt-CAM model, those on the probe, then the rest), with
    ``label`` and the bar's ``y`` (a gap between groups)."""
    order = {"prompt_cam": 0, "linear_probe": 1}
    own = table["method"].str.startswith("prompt_cam").to_numpy()
    group = np.where(own, 0, 1 + table["model"].map(order).fillna(2).to_numpy())
    rows = table.assign(group=group, position=np.arange(len(table)))
    rows = rows.sort_values(["group", "position"], kind="stable").reset_index(drop=True)
    rows["y"] = np.arange(len(rows)) + 0.6 * (rows["group"].rank(method="dense") - 1)
    rows["label"] = [
        localization_method_label(m, h)
        for m, h in zip(rows["method"], rows["fixed_head"], strict=True)
    ]
    return rows


def _bar_colors(rows: pd.DataFrame, style: FigureStyle) -> list[Any]:
    palette = sns.color_palette(style.palette)
    colors = {"prompt_cam": palette[0], "linear_probe": palette[1]}
    return [colors.get(model, "0.6") for model in rows["model"]]


def _axis_limit(tables: Sequence[pd.DataFrame], metric: str) -> float:
    """The x limit (%) of a metric's panels: 100 for the pointing game; for energy, which is
    small for spread maps, the largest value or chance level shown, rounded up to 10%."""
    if metric == "pointing_game":
        return 100.0
    columns = [metric, f"{metric}_uniform_chance", f"{metric}_fixed_place"]
    largest = max(float(np.nanmax(t[columns].to_numpy(np.float64), initial=0)) for t in tables)
    return float(min(100.0, 10 * np.ceil(100 * largest * 1.12 / 10) or 10))


def _localization_panel(
    ax: Axes, rows: pd.DataFrame, metric: str, style: FigureStyle, labelled: bool, limit: float
) -> None:
    """Horizontal bars of ``metric`` (%) per method, both chance levels over each bar."""
    values = 100 * rows[metric].to_numpy(np.float64)
    shown = ~np.isnan(values)
    y = rows["y"].to_numpy(np.float64)
    colors = np.array(_bar_colors(rows, style), dtype=object)
    ax.barh(y[shown], values[shown], 0.8, color=list(colors[shown]))
    size = max(5.0, style.font_size - 1.5)
    for at, value in zip(y, values, strict=True):
        text = "n/a" if np.isnan(value) else f"{value:.0f}"
        ax.annotate(
            text, (0 if np.isnan(value) else value, at), xytext=(1, 0),
            textcoords="offset points", va="center", ha="left", fontsize=size, color="0.15",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.2, "alpha": 0.8}, zorder=4,
        )  # fmt: skip
    for column, line in (("uniform_chance", CHANCE_STYLE), ("fixed_place", FIXED_PLACE_STYLE)):
        level = 100 * rows[f"{metric}_{column}"].to_numpy(np.float64)
        at = ~np.isnan(level)
        ax.vlines(level[at], y[at] - 0.45, y[at] + 0.45, **line, zorder=3)
    ax.set_yticks(y, list(rows["label"]) if labelled else [])
    ax.set_ylim(y.max() + 0.7 if len(y) else 1, -0.7)
    ax.set_xlim(0, limit)
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(axis="y", length=0)
    sns.despine(ax=ax)


def specificity_table(reports: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Pointing game (%) of each rank's kept heads (rows) against each rank's trait (columns)."""
    traits = list(dict.fromkeys(t for report in reports.values() for t in report["by_trait"]))
    return pd.DataFrame(
        [[_score(report["by_trait"].get(t, {}), "pointing_game") for t in traits]
         for report in reports.values()],
        index=[rank_label(rank) for rank in reports],
        columns=[rank_label(t) for t in traits],
    )  # fmt: skip


def _localization_legend(fig: Figure, style: FigureStyle) -> None:
    palette = sns.color_palette(style.palette)
    handles = [
        Rectangle((0, 0), 1, 1, color=palette[0], label=LOCALIZATION_MODELS["prompt_cam"]),
        Rectangle((0, 0), 1, 1, color=palette[1], label=LOCALIZATION_MODELS["linear_probe"]),
        Rectangle((0, 0), 1, 1, color="0.6", label="No model"),
        Line2D([], [], **CHANCE_STYLE, label="Uniform chance"),
        Line2D([], [], **FIXED_PLACE_STYLE, label="Fixed-place prior (train masks)"),
    ]
    _legend_above(fig, handles)


def _specificity_heat_map(ax: Axes, reports: Mapping[str, Any], style: FigureStyle) -> None:
    """Pointing game of each rank's kept heads (rows) on each rank's trait (columns)."""
    table = specificity_table(reports)
    sns.heatmap(
        table,
        ax=ax,
        vmin=0,
        vmax=100,
        cmap=style.attention_cmap,
        annot=table.map(lambda v: "n/a" if np.isnan(v) else f"{v:.0f}%"),
        fmt="",
        annot_kws={"fontsize": max(5.0, style.font_size - 1)},
        square=False,
        linewidths=0.5,
        linecolor="white",
        cbar_kws={"label": "Pointing game", "format": PercentFormatter(decimals=0)},
    )
    for row, rank in enumerate(table.index):
        if rank in table.columns:
            column = list(table.columns).index(rank)
            ax.add_patch(
                Rectangle((column, row), 1, 1, fill=False, edgecolor="black", linewidth=1.2)
            )
    ax.set_title("Kept heads (pooled) on every rank's trait", loc="left")
    ax.set_xlabel("Rank of the trait (own trait outlined)")
    ax.set_ylabel("Rank of the model")
    ax.tick_params(length=0)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)


def build_localization(
    *, localization: Mapping[str, Path], tables: Mapping[str, Path], style: FigureStyle
) -> Figure:
    """Per rank (columns), every method's pointing game (top row) and energy in mask (middle
    row) on the rank's own trait, from ``localization.tsv``, grouped by model, with the uniform
    chance and the fixed-place prior over each bar; below, the pointing game of each rank's
    kept heads against each rank's trait (``localization.json``, heat map)."""
    reports = _read_each(localization, read_localization, "localization.json")
    for rank, report in reports.items():
        _require(report, LOCALIZATION_KEYS, Path(localization[rank]), "localization")
    frames = _read_each(tables, read_localization_table, "localization.tsv")
    fig = new_figure(style, 2, 190)
    # Sub-figures keep the heat map's width from pulling the bar panels' columns apart.
    bars_fig, heat_fig = fig.subfigures(2, 1, height_ratios=[2, 0.65])
    grid = bars_fig.subplots(len(LOCALIZATION_METRICS), len(frames), squeeze=False)
    limits = {
        metric: _axis_limit(list(frames.values()), metric) for metric, _ in LOCALIZATION_METRICS
    }
    for column, (rank, table) in enumerate(frames.items()):
        rows = localization_bars(table)
        n_images = int(rows["n_images"].max()) if len(rows) else 0
        for row, (metric, label) in enumerate(LOCALIZATION_METRICS):
            ax = grid[row, column]
            _localization_panel(ax, rows, metric, style, column == 0, limits[metric])
            ax.set_xlabel(label)
            if row == 0:
                ax.set_title(f"{rank_label(rank)} (n = {n_images})")
    _localization_legend(fig, style)
    heat_ax = heat_fig.add_subplot(heat_fig.add_gridspec(1, 3)[0, :2])
    _specificity_heat_map(heat_ax, reports, style)
    return fig


def draw_localization(
    *,
    localization: Mapping[str, Path],
    tables: Mapping[str, Path],
    out_stem: Path,
    style: FigureStyle,
) -> list[Path]:
    """Every method's pointing game and energy in mask per rank (localization.tsv) with the
    uniform chance and the fixed-place prior, and the coarse-to-fine specificity heat map
    (localization.json: rank of the model x rank of the trait); two columns wide."""
    with styled(style):
        return save_figure(
            build_localization(localization=localization, tables=tables, style=style),
            out_stem,
            style,
        )


# ----------------------------------------------------------------------------- counterfactual

COUNTERFACTUAL_KEYS = ("top_trait_flip_rate", "random_flip_rate", "top_trait_probability_drop",
                       "random_probability_drop", "n_images")  # fmt: skip


def counterfactual_tables(
    reports: Mapping[str, Mapping[str, Any]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flip rate and probability drop (%) per rank (rows): top-trait region vs random ones."""
    index = [f"{rank_label(rank)}\n(n = {report['n_images']})" for rank, report in reports.items()]

    def table(kind: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "Top-trait region": [_score(r, f"top_trait_{kind}") for r in reports.values()],
                "Random regions": [_score(r, f"random_{kind}") for r in reports.values()],
            },
            index=index,
        )

    return table("flip_rate"), table("probability_drop")


def build_counterfactual(*, counterfactual: Mapping[str, Path], style: FigureStyle) -> Figure:
    """Flip rate (left) and true-class probability drop (right) per rank, top-trait region
    next to random regions of the same size."""
    reports = _read_each(counterfactual, read_counterfactual, "counterfactual.json")
    for rank, report in reports.items():
        _require(report, COUNTERFACTUAL_KEYS, Path(counterfactual[rank]), "fidelity")
    flips, drops = counterfactual_tables(reports)
    fig = new_figure(style, 1, 55)
    flip_ax, drop_ax = fig.subplots(1, 2)
    colors = sns.color_palette(style.palette)[2:4]
    grouped_bars(flip_ax, flips, colors)
    _percent_axis(flip_ax, "Predictions changed")
    grouped_bars(drop_ax, drops, colors)
    drop_ax.set_ylim(min(0.0, np.nanmin(drops.to_numpy(), initial=0.0) * 1.1), 100)
    drop_ax.set_ylabel("Drop in true-class\nprobability (points)")
    drop_ax.axhline(0, color="0.3", linewidth=0.5)
    for ax in (flip_ax, drop_ax):
        ax.set_xlabel("Rank of the model")
    handles, _ = flip_ax.get_legend_handles_labels()
    _legend_above(fig, handles)
    return fig


def draw_counterfactual(
    *, counterfactual: Mapping[str, Path], out_stem: Path, style: FigureStyle
) -> list[Path]:
    """Per rank (counterfactual.json): how often blanking the top trait's region changes the
    prediction, and how much the true class's probability drops, against random regions of
    the same size; one column wide."""
    with styled(style):
        return save_figure(
            build_counterfactual(counterfactual=counterfactual, style=style), out_stem, style
        )
