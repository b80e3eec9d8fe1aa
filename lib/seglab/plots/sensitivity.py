"""Figures of E4 (notebook 04_sensitivity): threshold heatmaps and one-setting-at-a-time lines.

Each function returns a matplotlib Figure (no pyplot). They take the tables of
:mod:`seglab.experiments.e4_sensitivity`.
"""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from seglab.plots.base import check_columns, new_figure
from seglab.plots.evaluation import plot_heatmap, plot_sensitivity

SOURCE = "seglab.experiments.e4_sensitivity"
METRICS = ("ap", "count_ratio")   # pooled AP@0.5 and predicted / true cells


def flow_cellprob_heatmaps(heat: pd.DataFrame, base: Mapping, *, panel_in: tuple[float, float] = (4.5, 3.2)):
    """One row per model (``heat``'s model order): pooled AP@0.5 (left) and predicted / true cells
    (right, diverging around 1) over flow_threshold x cellprob_threshold; a red square marks ``base``
    ({flow_threshold, cellprob_threshold}: the default setting). ``heat``: :func:`e4_sensitivity.flow_cellprob_grid`."""
    check_columns(heat, ["model", "flow_threshold", "cellprob_threshold", *METRICS], "flow_cellprob_heatmaps",
                  source=SOURCE)
    names = list(dict.fromkeys(heat["model"]))
    fig = new_figure((2 * panel_in[0], panel_in[1] * len(names)))
    axes = fig.subplots(len(names), 2, squeeze=False)
    for row, name in zip(axes, names):
        h = heat[heat["model"] == name]
        plot_heatmap(h, "flow_threshold", "cellprob_threshold", "ap", ax=row[0], best=base,
                     title=f"{name}: val AP@0.5")
        plot_heatmap(h, "flow_threshold", "cellprob_threshold", "count_ratio", ax=row[1], best=base,
                     fmt="{:.2f}", cmap="coolwarm", center=1.0, title=f"{name}: predicted / true cells")
    return fig


def sensitivity_lines(table: pd.DataFrame, marks: Mapping | None = None):
    """One panel per setting (columns), AP@0.5 (top) and predicted / true cells (bottom) against its value,
    one line per model; ``marks`` ({setting: value}) draws the default as a dotted line.
    ``table``: :func:`e4_sensitivity.outputs_sensitivity_table` or :func:`e4_sensitivity.rerun_table`."""
    check_columns(table, ["model", "parameter", "value", *METRICS], "sensitivity_lines", source=SOURCE)
    return plot_sensitivity(table, METRICS, hue="model", marks=dict(marks or {}))
