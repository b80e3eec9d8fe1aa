"""Figures of the label-efficiency (E2) and leave-one-marker-out (E6) experiments.

- :func:`plot_learning_curve`: AP against the number of annotated training tiles, one panel per
  metric, every repeat as a dot, reference models as lines, the plateau marked (E2);
- :func:`plot_marker_learning_curve`: the same curve per marker (E2, with per-tile scores);
- :func:`plot_marker_bars`: per held-out marker, one bar per model, per-tile AP as dots (E6).

Each function takes the tables of :mod:`seglab.experiments.e2_label_efficiency` or
:mod:`seglab.experiments.e6_leave_one_marker_out` and returns a headless
:class:`matplotlib.figure.Figure` (no pyplot); the notebook saves it with ``run.save_figure``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from seglab.evaluate import scoring
from seglab.plots.base import check_columns, new_figure


def plot_learning_curve(runs: pd.DataFrame, metrics: Mapping[str, str], *, references: Mapping[str, Mapping[str, float]] | None = None,
                        plateau: Mapping[str, int] | None = None, tolerance: float | None = None,
                        title: str | None = None, figsize=None):
    """Learning curves, one panel per metric: each repeat as a dot, the mean as a line, min-max shaded, SD bars.

    Parameters
    ----------
    runs : the table of :func:`seglab.experiments.e2_label_efficiency.label_budget_runs` (budget and
        the metric columns, AP as a fraction).
    metrics : {column: axis label}, e.g. {"ap_pooled": "val AP@0.5 (pooled)"}.
    references : {column: {label: value}} drawn as horizontal lines (baseline, full-data model).
    plateau : {column: budget} marked with a vertical line.
    tolerance : the plateau tolerance (AP), shown in the legend.
    title : the figure's title.
    figsize : (width, height) in inches; default 5.2 per panel x 4.

    Returns
    -------
    matplotlib.figure.Figure
    """
    metrics = dict(metrics)
    check_columns(runs, ["budget", *metrics], "plot_learning_curve",
                  source="seglab.experiments.e2_label_efficiency.label_budget_runs")
    fig = new_figure(figsize or (5.2 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    styles = [("tab:gray", "--"), ("tab:green", ":"), ("tab:purple", "-.")]
    for ax, (col, label) in zip(axes, metrics.items()):
        s = scoring.curve_summary(runs, col)
        x = s["budget"].to_numpy(float)
        ax.fill_between(x, s["min"], s["max"], color="tab:blue", alpha=0.15, lw=0, label="min-max over repeats")
        ax.errorbar(x, s["mean"], yerr=s["sd"], color="tab:blue", marker="o", capsize=3,
                    label="mean +- SD over repeats")
        rng = np.random.default_rng(0)  # jitter only; deterministic figure
        ax.scatter(runs["budget"] * np.exp(rng.uniform(-0.04, 0.04, len(runs))), runs[col], s=12, color="k",
                   alpha=0.6, zorder=3, lw=0, label="one repeat")
        for (name, value), (c, ls) in zip((references or {}).get(col, {}).items(), styles):
            if value is not None and np.isfinite(value):
                ax.axhline(value, color=c, ls=ls, lw=1.5, label=f"{name}: {value:.3f}")
        if plateau and col in plateau:
            tol = f" (within {tolerance:g} AP of the best mean)" if tolerance is not None else ""
            ax.axvline(plateau[col], color="tab:red", lw=1, alpha=0.7, label=f"plateau: {plateau[col]} tiles{tol}")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(int(b)) for b in x])
        ax.minorticks_off()
        ax.set_xlabel("annotated training tiles (budget)")
        ax.set_ylabel(label)
        # zoom on the data and the reference lines (AP differences of a few points matter here)
        vals = np.concatenate([runs[col].to_numpy(float),
                               [v for v in (references or {}).get(col, {}).values() if v is not None]])
        vals = vals[np.isfinite(vals)]
        lo = max(0.0, float(vals.min()) - 0.15) if len(vals) else 0.0
        ax.set_ylim(lo, min(1.0, float(vals.max()) + 0.05) if len(vals) else 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def plot_marker_learning_curve(curve: pd.DataFrame, budgets: Sequence[int] | None = None, *,
                               ylabel: str = "validation AP@0.5 (pooled per marker)", figsize=(6, 4)):
    """The learning curve per marker: mean over draws as a line, min-max over draws as a band.

    Parameters
    ----------
    curve : the table of :func:`seglab.experiments.e2_label_efficiency.marker_curve`: marker,
        budget (tiles), mean, min, max (AP as a fraction).
    budgets : the x ticks (tiles); default every budget of ``curve``.
    ylabel : the y axis label.
    figsize : (width, height) in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    check_columns(curve, ["marker", "budget", "mean", "min", "max"], "plot_marker_learning_curve",
                  source="seglab.experiments.e2_label_efficiency.marker_curve")
    budgets = sorted(curve["budget"].unique()) if budgets is None else list(budgets)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    for marker, g in curve.groupby("marker"):
        ax.plot(g["budget"], g["mean"], marker="o", label=marker)
        ax.fill_between(g["budget"], g["min"], g["max"], alpha=0.1)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(int(b)) for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("annotated training tiles (budget)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("learning curve per marker (mean over draws, band: min-max)")
    return fig


def plot_marker_bars(table: pd.DataFrame, per_image: pd.DataFrame | None = None, *, metric: str = "ap_pooled",
                     models_order: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                     ylabel: str = "AP@0.5", iou: float = 0.5, title: str | None = None, figsize=None):
    """Grouped bars: one group per marker, one bar per model (``metric``); per-image AP as dots.

    Parameters
    ----------
    table : the table of :func:`seglab.experiments.e6_leave_one_marker_out.evaluate_lomo`: marker,
        model and ``metric`` (AP as a fraction), one row per (marker, model).
    per_image : its per-tile table (model, marker, threshold, ap), drawn as dots; None: bars only.
    metric : the column the bars show.
    models_order : the bars' order within a group (default: the table's order).
    labels : {model: legend label}.
    ylabel : the y axis label.
    iou : the IoU threshold of the per-tile dots.
    title : the figure's title.
    figsize : (width, height) in inches; default grows with the number of bars.

    Returns
    -------
    matplotlib.figure.Figure
    """
    check_columns(table, ["marker", "model", metric], "plot_marker_bars",
                  source="seglab.experiments.e6_leave_one_marker_out.evaluate_lomo")
    order = list(models_order or dict.fromkeys(table["model"]))
    labels = dict(labels or {})
    markers = list(dict.fromkeys(table["marker"]))
    fig = new_figure(figsize or (max(6.5, 1.5 + 0.6 * len(markers) * max(1, len(order))), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(order))
    colors = ["#bdbdbd", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8"]
    rng = np.random.default_rng(0)
    for j, name in enumerate(order):
        vals = [table.loc[(table["marker"] == m) & (table["model"] == name), metric] for m in markers]
        heights = [float(v.iloc[0]) if len(v) else np.nan for v in vals]
        pos = np.arange(len(markers)) + (j - (len(order) - 1) / 2) * width
        bars = ax.bar(pos, heights, width=width * 0.95, color=colors[j % len(colors)], edgecolor="k", lw=0.5,
                      label=labels.get(name, name))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        if per_image is not None:
            sub = per_image[(per_image["model"] == name) & np.isclose(per_image["threshold"], iou)]
            for p, m in zip(pos, markers):
                v = sub.loc[sub["marker"] == m, "ap"].to_numpy(float)
                ax.scatter(p + rng.uniform(-width / 4, width / 4, len(v)), v, s=7, color="k", alpha=0.6, lw=0, zorder=3)
    ax.set_xticks(np.arange(len(markers)), markers)
    ax.set_xlabel("held-out marker (its tiles only)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=1, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    if title:
        fig.suptitle(title)
    return fig
