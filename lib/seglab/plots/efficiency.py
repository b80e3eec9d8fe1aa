"""TODO docstring"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from seglab.evaluate import scoring


def plot_learning_curve(runs: pd.DataFrame, metrics: Mapping[str, str], *, references: Mapping[str, Mapping[str, float]] | None = None,
                        plateau: Mapping[str, int] | None = None, tolerance: float | None = None,
                        figsize=None):
    """Learning curves, one panel per metric: each repeat as a dot, the mean as a line, min-max shaded, SD bars.

    Parameters
    ----------
    runs : the table of :func:`label_budget_runs`.
    metrics : {column: axis label}, e.g. {"ap_pooled": "val AP@0.5 (pooled)"}.
    references : {column: {label: value}} drawn as horizontal lines (baseline, full-data model).
    plateau : {column: budget} marked with a vertical line.
    tolerance : the plateau tolerance (AP), shown in the legend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    metrics = dict(metrics)
    fig = Figure(figsize=figsize or (5.2 * len(metrics), 4), layout="constrained")
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
    return fig


def plot_marker_bars(table: pd.DataFrame, per_image: pd.DataFrame | None = None, *, metric: str = "ap_pooled",
                     models_order: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                     ylabel: str = "AP@0.5", iou: float = 0.5, figsize=None):
    """Grouped bars: one group per marker, one bar per model (``metric``); per-image AP as dots.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    order = list(models_order or dict.fromkeys(table["model"]))
    labels = dict(labels or {})
    markers = list(dict.fromkeys(table["marker"]))
    fig = Figure(figsize=figsize or (max(6.5, 1.5 + 0.6 * len(markers) * max(1, len(order))), 4.5),
                 layout="constrained")
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
    return fig
