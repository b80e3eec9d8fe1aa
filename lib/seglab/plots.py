"""Figures of the evaluation tables (a module of functions; each returns a matplotlib Figure).

The functions build a :class:`matplotlib.figure.Figure` directly (no pyplot, no
``plt.show()``), so they work headless, in notebooks (a returned Figure is
displayed) and in batch runs (``run.save_figure(fig, ...)`` or ``fig.savefig``).
They take the tables of :func:`seglab.metrics.evaluate` (or an
:class:`seglab.metrics.Evaluation` itself).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError

METRIC_LABELS = {
    "ap": "AP = TP / (TP + FP + FN)",
    "f1": "F1",
    "precision": "precision",
    "recall": "recall",
    "panoptic_quality": "panoptic quality",
    "mean_matched_iou": "mean IoU of matched pairs",
    "mean_true_score": "mean true score",
    "foreground_iou": "foreground pixel IoU",
    "foreground_dice": "foreground pixel Dice",
}


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SeglabError(f"{what}: missing column(s) {missing} (have {list(df.columns)}); "
                          f"pass a table from seglab.metrics.evaluate")


def plot_metric_vs_threshold(result, metrics: Sequence[str] = ("ap", "f1"), *, summary: str = "pooled",
                             label: str | None = None, ax=None, figsize=(4.5, 3.5)):
    """Metrics against the IoU threshold, one line per metric.

    Parameters
    ----------
    result : Evaluation or DataFrame
        An :class:`~seglab.metrics.Evaluation`, or a table with ``threshold`` and
        the metric columns (``pooled``, ``mean_over_images``, or :func:`seglab.metrics.match`'s output).
    metrics : sequence of str
        Columns to draw, e.g. ("ap", "f1", "panoptic_quality").
    summary : "pooled" or "mean_over_images"
        Which summary of an Evaluation to draw; with "mean_over_images" a band
        shows +- one standard deviation across images.
    label : str, optional
        Prefix for the legend (e.g. the model name, to overlay models on one ``ax``).
    ax : matplotlib Axes, optional
        Draw into it (its Figure is returned) instead of a new Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if hasattr(result, "pooled"):
        if summary not in ("pooled", "mean_over_images"):
            raise SeglabError(f"summary must be 'pooled' or 'mean_over_images', got {summary!r}")
        table = getattr(result, summary)
    else:
        table = result
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    _check_columns(table, ["threshold", *metrics], "plot_metric_vs_threshold")
    if ax is None:
        fig = _figure(figsize)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    table = table.sort_values("threshold")
    x = table["threshold"].to_numpy(float)
    for m in metrics:
        y = table[m].to_numpy(float)
        name = f"{label} {m}" if label else m
        (line,) = ax.plot(x, y, marker="o", ms=3, label=name)
        sd_col = f"{m}_sd"
        if sd_col in table.columns:
            sd = table[sd_col].to_numpy(float)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(METRIC_LABELS.get(metrics[0], metrics[0]) if len(metrics) == 1 else "score")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(min(x.min(), 0.5) - 0.02, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    if hasattr(result, "pooled"):
        ax.set_title(summary.replace("_", " "), fontsize="medium")
    return fig


def plot_group_bars(per_image: pd.DataFrame, group: str, metric: str = "ap", threshold: float = 0.5, *,
                    ax=None, figsize=(5, 3.5), seed: int = 0):
    """Bars per group (mean over images) with the spread across images: SD error bars and each image as a dot.

    Parameters
    ----------
    per_image : DataFrame or Evaluation
        :attr:`Evaluation.per_image` (one row per image x threshold, with the group column).
    group : str
        The grouping column, e.g. "marker" or "donor".
    metric : str
        The per-image metric, e.g. "ap", "f1", "foreground_dice".
    threshold : float
        The IoU threshold whose rows are drawn (must be one of the evaluated thresholds).
    seed : int
        Seed of the horizontal jitter of the dots (deterministic figures).

    Returns
    -------
    matplotlib.figure.Figure
        Images where both masks are empty are left out (as in ``mean_over_images``).
    """
    if hasattr(per_image, "per_image"):
        per_image = per_image.per_image
    _check_columns(per_image, ["threshold", group, metric], "plot_group_bars")
    at = np.isclose(per_image["threshold"].to_numpy(float), threshold)
    if not at.any():
        raise SeglabError(f"plot_group_bars: threshold {threshold} was not evaluated "
                          f"(have {sorted(per_image['threshold'].unique())}); pick one of those")
    sub = per_image[at]
    if "both_empty" in sub.columns:
        sub = sub[~sub["both_empty"].astype(bool)]
    groups = sorted(sub[group].dropna().unique(), key=str)
    rng = np.random.default_rng(seed)
    if ax is None:
        fig = _figure(figsize)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    means, sds, counts = [], [], []
    for g in groups:
        vals = sub.loc[sub[group] == g, metric].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        means.append(vals.mean() if len(vals) else np.nan)
        sds.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
        counts.append(len(vals))
    pos = np.arange(len(groups))
    ax.bar(pos, means, yerr=sds, capsize=3, color="#9ecae1", edgecolor="#3182bd", label="mean +- SD over images")
    for i, g in enumerate(groups):
        vals = sub.loc[sub[group] == g, metric].to_numpy(float)
        ax.scatter(i + rng.uniform(-0.25, 0.25, len(vals)), vals, s=8, color="k", alpha=0.6, zorder=3, lw=0)
    ax.set_xticks(pos, [f"{g}\n(n={n})" for g, n in zip(groups, counts)])
    ax.set_xlabel(group)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} at IoU {threshold:g}")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    return fig
