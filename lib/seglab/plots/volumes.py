"""Figures of 3D segmentation (E7, ``seglab test-3d``).

- :func:`plot_orthoslices`: the xy, xz and yz slices through a volume's centre with the outlines
  of the objects coloured by match outcome at one IoU threshold: matched predictions green,
  false positives red, missed true objects orange (dashed look: thinner);
- :func:`plot_method_comparison`: one panel per metric, one bar per method (grouped by
  ``group``, e.g. anisotropy, when given), from :func:`seglab.evaluate.volumes.compare_methods`
  or E7's comparison table.

Headless :class:`matplotlib.figure.Figure` objects (no pyplot).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from seglab.plots.base import check_columns, new_figure

OUTCOME_COLOURS = {"matched": (0.1, 0.8, 0.2), "false positive": (0.95, 0.15, 0.1), "missed": (1.0, 0.6, 0.0)}


def _outline(ax, labels2d: np.ndarray, ids, colour, aspect: float, width: float) -> None:
    from skimage.segmentation import find_boundaries

    if not len(ids):
        return
    sel = np.where(np.isin(labels2d, np.asarray(list(ids))), labels2d, 0)
    edge = find_boundaries(sel, mode="inner")
    rgba = np.zeros((*edge.shape, 4))
    rgba[edge] = (*colour, width)
    ax.imshow(rgba, aspect=aspect, interpolation="nearest")


def plot_orthoslices(image: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, *, anisotropy: float = 1.0,
                     iou: float = 0.5, centre: Sequence[int] | None = None, title: str | None = None, figsize=None):
    """xy, xz and yz slices of ``image`` (Z, Y, X) through ``centre`` (default: the middle) with outlines
    coloured by match outcome at IoU ``iou`` (:func:`seglab.evaluate.metrics.matched_pairs`).
    xz and yz panels are stretched by ``anisotropy`` so that um look the same on every axis."""
    from seglab.evaluate import metrics

    pairs = metrics.matched_pairs(y_true, y_pred, threshold=iou)
    matched_pred, matched_true = set(pairs["pred_id"].tolist()), set(pairs["true_id"].tolist())
    pred_ids, true_ids = set(np.unique(y_pred)) - {0}, set(np.unique(y_true)) - {0}
    groups = {"matched": (y_pred, matched_pred, 0.9), "false positive": (y_pred, pred_ids - matched_pred, 0.9),
              "missed": (y_true, true_ids - matched_true, 0.6)}
    cz, cy, cx = centre if centre is not None else [n // 2 for n in image.shape]
    views = [("xy (z = %d)" % cz, lambda v: v[cz], 1.0), ("xz (y = %d)" % cy, lambda v: v[:, cy], anisotropy),
             ("yz (x = %d)" % cx, lambda v: v[:, :, cx], anisotropy)]
    fig = new_figure(figsize or (12, 4.4))
    axes = fig.subplots(1, 3)
    lo, hi = np.percentile(image, [1, 99.5])
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.imshow(cut(image), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        for outcome, (lab, ids, width) in groups.items():
            _outline(ax, cut(lab), ids, OUTCOME_COLOURS[outcome], aspect, width)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=f"{k} ({len(groups[k][1])})") for k, c in OUTCOME_COLOURS.items()],
               loc="outside lower center", ncols=3, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_method_comparison(table: pd.DataFrame, *, metrics: Sequence[str] = ("ap", "f1", "boundary_f1", "foreground_dice"),
                           threshold: float = 0.5, group: str | None = None, methods: Sequence[str] | None = None,
                           title: str | None = None, figsize=None):
    """One panel per metric: a bar per method, side by side within each ``group`` value (e.g.
    anisotropy), at IoU ``threshold``. ``table``: rows with method, threshold and the metrics."""
    check_columns(table, ["method", "threshold", *metrics] + ([group] if group else []), "plot_method_comparison",
                  source="seglab.evaluate.volumes.compare_methods")
    sub = table[np.isclose(table["threshold"], threshold)]
    methods = list(methods) if methods is not None else list(dict.fromkeys(sub["method"]))
    groups = list(dict.fromkeys(sub[group])) if group else [None]
    fig = new_figure(figsize or (3.2 * len(metrics), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for ax, metric in zip(axes, metrics):
        for i, m in enumerate(methods):
            vals = [float(sub.loc[(sub["method"] == m) & ((sub[group] == g) if group else True), metric].mean())
                    for g in groups]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{group} {g:g}" if group and isinstance(g, (int, float)) else str(g or "")
                            for g in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{metric} (IoU {threshold:g})" if metric in ("ap", "f1", "precision", "recall") else metric,
                     fontsize=9)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
