"""Figures of E4 (notebook 04_sensitivity): threshold heatmaps, one-setting-at-a-time lines and the
ranges of AP per setting with their intervals.

Each function returns a matplotlib Figure (no pyplot). They take the tables of
:mod:`seglab.experiments.e4_sensitivity`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from seglab.evaluate import claims
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


def range_intervals(found: pd.DataFrame, metric: str = "ap", threshold: float = 0.5, *,
                    panel_in: tuple[float, float] = (5.5, 0.45)):
    """One panel per model: for each setting, the range of pooled AP@0.5 over the values tried (bar)
    with its interval (black line: a bootstrap of donors, then tiles; the x label says which) and
    the p-value of "the setting changes nothing" beside it. A range is never negative and its
    bootstrap is biased upwards, so the interval says how large a range is, the p-value whether
    there is one. ``found``: :func:`e4_sensitivity.range_claims`."""
    check_columns(found, ["model", "parameter", "metric", "threshold", "range", "ci_low", "ci_high", "p_value"],
                  "range_intervals", source=SOURCE)
    rows = found[(found["metric"] == metric) & np.isclose(found["threshold"].astype(float), threshold)]
    names = list(dict.fromkeys(rows["model"]))
    n_max = max([int((rows["model"] == m).sum()) for m in names] or [1])
    fig = new_figure((panel_in[0] * max(1, len(names)), panel_in[1] * n_max + 1.4))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, name in zip(axes, names):
        sub = rows[rows["model"] == name].sort_values("range")
        y = np.arange(len(sub))
        ax.barh(y, sub["range"], color="tab:blue", alpha=0.5)
        ax.hlines(y, sub["ci_low"], sub["ci_high"], color="k", lw=1.5)   # NaN bounds draw nothing
        ax.set_yticks(y, [f"{p}  (p={v:.3g})" for p, v in zip(sub["parameter"], sub["p_value"])], fontsize=8)
        ax.set_title(f"{name}: range of val {metric.upper() if metric == 'ap' else metric}@{threshold:g}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(left=0)
    what = f"lines: {claims.interval_label(rows)}" if len(rows) else "no setting has two values: no range"
    fig.supxlabel(f"max - min over the values tried (fraction); {what}", fontsize=9)
    return fig
